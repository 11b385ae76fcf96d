"""The partitioner actor on planted groups: what one version holds, how it is aligned to the last one, and the pool
that splits groups over actors on a real local Ray."""

import time

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from orchestrator.gather import GroupSnapshot
from orchestrator.modularity import GroupPartition
from orchestrator.partitioning.actor import Partitioner, PartitionerPool, PartitionShare, start_partitioners
from orchestrator.spec import ModularitySpec, PartitionerSpec

K = 4


def planted_group(seed: int, hidden: int = 32, width: int = 16) -> tuple[GroupSnapshot, torch.Tensor]:
    """One in- and one out-projection whose hidden units form K planted blocks; the snapshot and the true hidden
    labels [hidden]."""
    generator = torch.Generator().manual_seed(seed)

    def labels(n: int) -> torch.Tensor:
        return (torch.arange(n) % K)[torch.randperm(n, generator=generator)]

    units, inputs, outputs = labels(hidden), labels(width), labels(width)
    weight_in = torch.randn(hidden, width, generator=generator) * torch.where(
        units[:, None] == inputs[None, :], 1.0, 0.05
    )  # [hidden, n_in]
    weight_out = torch.randn(width, hidden, generator=generator) * torch.where(
        outputs[:, None] == units[None, :], 1.0, 0.05
    )  # [n_out, hidden]
    snapshot = GroupSnapshot(
        weights_in=(weight_in.numpy(),),
        weights_out=(weight_out.numpy(),),
        names=(f"group{seed}.in", f"group{seed}.out"),
    )
    return snapshot, units


def modularity(**settings) -> dict:
    return ModularitySpec(k=K, **settings).model_dump(mode="json", by_alias=True)


@pytest.fixture
def partitioner():
    """The actor's class as Ray runs it, called in this process: its methods without an actor around them."""
    return Partitioner.__ray_metadata__.modified_class(modularity())


def test_a_first_version_recovers_the_planted_blocks_with_no_agreement_to_report(partitioner):
    """Without a previous version every group is partitioned (the planted blocks, exactly) and no agreement is
    reported, since there is nothing to agree with."""
    (snapshot, truth), (other, other_truth) = planted_group(0), planted_group(1)
    share = partitioner.partition({"a": snapshot, "b": other}, None)
    assert isinstance(share, PartitionShare) and share.agreement == {} and share.seconds >= 0
    for name, expected in (("a", truth), ("b", other_truth)):
        found = GroupPartition.from_dict(share.partitions[name])
        assert found.k == K and adjusted_rand_score(expected.tolist(), found.hidden.tolist()) == 1.0


def test_a_version_is_renamed_to_agree_with_the_previous_one(partitioner):
    """Given the previous version (the same clusters under other names), the new one takes the previous names:
    identical labels, agreement 1."""
    snapshot, _ = planted_group(0)
    first = GroupPartition.from_dict(partitioner.partition({"a": snapshot}, None).partitions["a"])
    renamed = first.permuted(torch.tensor([2, 3, 0, 1]))
    share = partitioner.partition({"a": snapshot}, {"a": renamed.to_dict()})
    assert share.partitions["a"] == renamed.to_dict()
    assert share.agreement == {"a": pytest.approx(1.0)}


def test_the_simulated_delay_is_waited_but_not_counted():
    """``partitioner.delay_s`` holds the answer back, but the seconds reported are the co-clustering's alone."""
    delayed = Partitioner.__ray_metadata__.modified_class(modularity(), delay_s=0.5)
    started = time.perf_counter()
    share = delayed.partition({"a": planted_group(0)[0]}, None)
    assert time.perf_counter() - started >= 0.5
    assert share.seconds < time.perf_counter() - started - 0.5 + 0.05


@pytest.mark.slow
def test_a_pool_of_two_actors_splits_the_groups_and_draws_their_heatmaps(local_ray):
    """On a real local Ray: groups alternate over two named actors, `ready` turns true without blocking, the
    answers hold every group, and the heatmaps every matrix."""
    import ray

    from orchestrator.train.launch import ensure_ray
    from tests.helpers import tiny_spec

    ensure_ray(tiny_spec())
    actors = start_partitioners(ModularitySpec(k=K), PartitionerSpec(actors=2))
    try:
        groups = {f"g{seed}": planted_group(seed) for seed in range(3)}
        pool = PartitionerPool(list(actors), list(groups))
        request = pool.request({name: snapshot for name, (snapshot, _) in groups.items()}, None, draw=True)
        deadline = time.monotonic() + 120
        while not PartitionerPool.ready(request):
            assert time.monotonic() < deadline, "the actors did not answer in 120 s"
            time.sleep(0.2)
        first, second = PartitionerPool.collect(request)
        assert set(first.partitions) == {"g0", "g2"} and set(second.partitions) == {"g1"}
        for share in (first, second):
            for name, labels in share.partitions.items():
                truth = groups[name][1].tolist()
                assert adjusted_rand_score(truth, labels["hidden"]) == 1.0, name
        pictures = PartitionerPool.collect_heatmaps(request, timeout_s=120)
        assert set(pictures) == {f"group{seed}.{side}" for seed in range(3) for side in ("in", "out")}
        assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pictures.values())
    finally:
        for actor in actors.values():
            ray.kill(actor)

"""The partitioner: Ray actors that co-cluster the trainers' matrices off the training path.

Runbook: the driver starts ``partitioner.actors`` named actors with the job (``start_partitioners``). When a
partition is due, rank 0 gathers the regularised matrices, puts each actor's share of the groups in the object
store and calls ``Partitioner.partition`` without waiting (``PartitionerPool.request``); training goes on with
the current partition while the actors co-cluster, align the new labels to the current ones and return them.
The returned object is the published version: rank 0 polls it (``ready``) and the trainers adopt it together.
Heatmaps, when due, are a second call (``Partitioner.draw``) that runs beside the next partition (two threads
per actor), so drawing never delays a version.

The actors keep no state between calls: each request carries the partition the trainers are using. So when
an actor dies, Ray restarts it (``max_restarts=-1``) and retries the call in flight (``max_task_retries=-1``),
and the restarted actor continues from the last published version with nothing to recover.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import ray
import torch

from orchestrator.gather import GroupSnapshot
from orchestrator.spec import ModularitySpec, PartitionerSpec


@dataclass(frozen=True)
class PartitionShare:
    """One actor's part of a version: its groups' partitions and what the MLflow view shows about them."""

    partitions: dict[str, dict]  # group name -> GroupPartition.to_dict()
    agreement: dict[str, float]  # group name -> adjusted Rand index with the previous labels (none at first)
    seconds: float  # time to co-cluster and align, the delay excluded


@dataclass(frozen=True)
class PartitionRequest:
    """What rank 0 holds while the actors work: one answer per actor to come, and the heatmaps when asked."""

    shares: list[ray.ObjectRef]  # each resolves to a PartitionShare
    heatmaps: list[ray.ObjectRef]  # each resolves to {matrix name: PNG}; empty when no heatmaps were asked


@ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=2)
class Partitioner:
    """Co-clusters the groups it is sent; a GPU when the job gives it one."""

    def __init__(self, modularity: dict, delay_s: float = 0.0):
        self._modularity = ModularitySpec.model_validate(modularity)
        self._delay_s = delay_s
        self._device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"

    def partition(self, snapshot: dict[str, GroupSnapshot], previous: dict[str, dict] | None) -> PartitionShare:
        """Partition every group of `snapshot`, renamed to agree with `previous` (same groups) where given."""
        from sklearn.metrics import adjusted_rand_score

        from orchestrator.modularity import GroupPartition, partition_group

        time.sleep(self._delay_s)
        started = time.perf_counter()
        modularity = self._modularity
        partitions, agreement = {}, {}
        for name, group in snapshot.items():
            weights_in, weights_out = group.tensors(self._device)
            partition = partition_group(
                weights_in, weights_out, modularity.k, method=modularity.partition, seed=modularity.seed
            )
            if previous is not None:
                before = GroupPartition.from_dict(previous[name])
                partition = partition.aligned_to(before)
                agreement[name] = float(adjusted_rand_score(_all_labels(before), _all_labels(partition)))
            partitions[name] = partition.to_dict()
        return PartitionShare(partitions, agreement, time.perf_counter() - started)

    def draw(self, snapshot: dict[str, GroupSnapshot], share: PartitionShare) -> dict[str, bytes]:
        """Heatmaps of `snapshot`'s matrices under `share`'s partitions (Ray waits for `share` first)."""
        return draw_heatmaps(snapshot, share.partitions)


def draw_heatmaps(snapshot: dict[str, GroupSnapshot], partitions: dict[str, dict]) -> dict[str, bytes]:
    """A PNG heatmap of every matrix of `snapshot` under its group's partition, by matrix name."""
    from orchestrator.modularity import GroupPartition
    from orchestrator.partitioning.heatmaps import block_heatmap

    pictures = {}
    for name, group in snapshot.items():
        partition = GroupPartition.from_dict(partitions[name])
        weights_in, weights_out = group.tensors()
        for matrix, weight, (rows, cols) in zip(
            group.names, weights_in + weights_out, partition.matrix_labels(), strict=True
        ):
            pictures[matrix] = block_heatmap(weight, rows, cols, partition.k, matrix)
    return pictures


def _all_labels(partition) -> list[int]:
    return torch.cat([partition.hidden, *partition.inputs, *partition.outputs]).tolist()


def start_partitioners(modularity: ModularitySpec, settings: PartitionerSpec) -> dict[str, ray.actor.ActorHandle]:
    """Driver side: start the job's partitioner actors with the spec's resources, by their (unique) Ray names;
    the trainers find them by name, and the driver kills them when the job ends."""
    modularity = modularity.model_dump(mode="json", by_alias=True)
    tag = uuid.uuid4().hex[:12]
    return {
        name: Partitioner.options(name=name, num_cpus=settings.cpus, num_gpus=settings.gpus).remote(
            modularity, settings.delay_s
        )
        for name in (f"xcm-partitioner-{tag}-{index}" for index in range(settings.actors))
    }


class PartitionerPool:
    """Rank 0's handle on the actors: group ``i`` goes to actor ``i mod actors``, so big models split."""

    def __init__(self, names: list[str], group_names: list[str]):
        self._actors = [ray.get_actor(name) for name in names]
        self._shares = [group_names[index :: len(names)] for index in range(len(names))]

    def request(
        self, snapshot: dict[str, GroupSnapshot], previous: dict[str, dict] | None, draw: bool
    ) -> PartitionRequest:
        """Send every actor its groups (and, with `draw`, ask for heatmaps of them), without waiting."""
        shares, heatmaps = [], []
        for actor, names in zip(self._actors, self._shares, strict=True):
            own = ray.put({name: snapshot[name] for name in names})
            before = {name: previous[name] for name in names} if previous is not None else None
            shares.append(actor.partition.remote(own, before))
            if draw:
                heatmaps.append(actor.draw.remote(own, shares[-1]))
        return PartitionRequest(shares, heatmaps)

    @staticmethod
    def ready(request: PartitionRequest) -> bool:
        """Whether every actor has answered; never blocks."""
        references = request.shares
        done, _ = ray.wait(references, num_returns=len(references), timeout=0, fetch_local=False)
        return len(done) == len(references)

    @staticmethod
    def collect(request: PartitionRequest) -> list[PartitionShare]:
        """The actors' answers, waiting for them when needed (raises when an actor failed for good)."""
        return ray.get(request.shares)

    @staticmethod
    def collect_heatmaps(request: PartitionRequest, timeout_s: float = 600) -> dict[str, bytes]:
        """Every actor's heatmaps by matrix name: for the logger's artifact thread, never the training loop."""
        return {
            name: png for pictures in ray.get(request.heatmaps, timeout=timeout_s) for name, png in pictures.items()
        }

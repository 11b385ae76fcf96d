"""The partition schedule: its adoption policy, what a checkpoint keeps, and what a resumed run does with it."""

import io

import pytest
import torch
import transformers

from orchestrator.gather import gather
from orchestrator.modularity import (
    ClusterabilityRegulariser,
    GroupPartition,
    clusterability,
    find_matrix_groups,
    partition_group,
)
from orchestrator.partitioning import schedule as partition_schedule
from orchestrator.partitioning.actor import PartitionShare
from orchestrator.partitioning.schedule import PartitionSchedule
from orchestrator.ranks import Rank
from orchestrator.side_jobs import step_boundary
from orchestrator.spec import ModularitySpec, PartitionerSpec

LEAD, OTHER = Rank(0, 1), Rank(1, 2)  # rank 0 (with the actors' answers) and another rank, in no started world


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=16, vocab_size=40)
    )


@pytest.fixture
def model():
    return tiny_gpt2()


def schedule_for(model, regulariser=None, **modularity) -> PartitionSchedule:
    """Rank 1 of a world that is not started: the schedule's own logic, no Ray, no collectives."""
    return PartitionSchedule(
        find_matrix_groups(model),
        regulariser or ClusterabilityRegulariser(),
        ModularitySpec(**modularity),
        PartitionerSpec(),
        rank=OTHER,
        device=torch.device("cpu"),
        actor_names=(),
        metric_logger=None,
    )


def at_boundary(schedule: PartitionSchedule, model, step: int, rank: Rank = LEAD) -> int | None:
    """What the training session of `rank` does for the side job before `step`; the version adopted there."""
    before, groups = schedule.version, find_matrix_groups(model)
    step_boundary(schedule, step, lambda needs: gather(needs, model, groups, rank))
    return schedule.version if schedule.version != before else None


def saved_state(model) -> dict:
    partitions = {
        group.name: partition_group(
            [m.weight() for m in group.inputs], [m.weight() for m in group.outputs], 4, seed=1
        ).to_dict()
        for group in find_matrix_groups(model)
    }
    return {
        "version": 3,
        "last_request": 20,
        "partitions": partitions,
        "adoptions": [
            {"version": 1, "requested_at": 0, "adopted_at": 0},
            {"version": 2, "requested_at": 10, "adopted_at": 14},
            {"version": 3, "requested_at": 20, "adopted_at": 23},
        ],
        "pending": None,
    }


def test_state_round_trips_and_drives_the_regulariser(model):
    """A loaded state is the state saved (plain lists), and the regulariser measures C under its labels."""
    state, regulariser = saved_state(model), ClusterabilityRegulariser()
    schedule = schedule_for(model, regulariser)
    schedule.load_state_dict(state)
    assert schedule.state_dict() == state and schedule.version == 3
    regulariser.clear()
    model(torch.zeros(1, 4, dtype=torch.long))
    values = regulariser.values()
    for group in find_matrix_groups(model):
        labels = schedule.partitions[group.name].matrix_labels()
        for matrix, (rows, cols) in zip(group.matrices, labels, strict=True):
            expected = clusterability(matrix.weight().detach(), rows, cols)
            assert float(values[matrix.name].detach()) == pytest.approx(float(expected))
            assert 0 < schedule.baselines[matrix.name] < 1


def test_resumed_run_keeps_its_partition_until_the_next_request_is_due(model):
    """Resumed after a request at step 20: every 10 steps asks again at 30, not before; every 0 never asks."""
    once = schedule_for(model, partition_every=0)
    once.load_state_dict(saved_state(model))
    for step in range(24, 60):
        assert at_boundary(once, model, step, OTHER) is None
    assert once.state_dict()["last_request"] == 20

    periodic = schedule_for(model, partition_every=10)
    periodic.load_state_dict(saved_state(model))
    for step in range(25, 30):
        at_boundary(periodic, model, step, OTHER)
    assert periodic.state_dict()["last_request"] == 20
    at_boundary(periodic, model, 30, OTHER)
    assert periodic.state_dict()["last_request"] == 30 and periodic.version == 3  # asked; not adopted yet


class LocalPool:
    """The partitioner actors' work, done in the test's process when collected; `answered` is what `ready`
    reports (False: actors slower than any lag)."""

    answered = False

    def __init__(self, names, group_names):
        pass

    @staticmethod
    def request(snapshot, previous, draw):
        return snapshot, previous

    def ready(self, sent) -> bool:
        return self.answered

    @staticmethod
    def collect(sent) -> list[PartitionShare]:
        snapshot, previous = sent
        partitions = {}
        for name, group in snapshot.items():
            partition = partition_group(*group.tensors(), 4, seed=0)
            if previous is not None:
                partition = partition.aligned_to(GroupPartition.from_dict(previous[name]))
            partitions[name] = partition.to_dict()
        return [PartitionShare(partitions, {}, 0.0)]


@pytest.fixture
def local_pool(monkeypatch):
    monkeypatch.setattr(partition_schedule, "PartitionerPool", LocalPool)
    return LocalPool


def rank_zero_schedule(model, lag: int) -> PartitionSchedule:
    """Rank 0 of a world that is not started, its actors replaced by `LocalPool`: every 4 steps, `lag` to adopt."""
    return PartitionSchedule(
        find_matrix_groups(model),
        ClusterabilityRegulariser(),
        ModularitySpec(partition_every=4),
        PartitionerSpec(adopt_after_steps=lag),
        rank=LEAD,
        device=torch.device("cpu"),
        actor_names=(),
        metric_logger=None,
    )


def train(schedule, model, steps, labels: dict) -> None:
    """The loop's side of the schedule; the weights move every step (the same way in every run), so each
    version's labels show the step its weights were gathered at. `labels` gets each adopted version's."""
    for step in steps:
        version = at_boundary(schedule, model, step)
        if version is not None:
            labels[version] = {name: partition.hidden.tolist() for name, partition in schedule.partitions.items()}
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)


@pytest.mark.parametrize("answered", [False, True])
def test_a_fixed_lag_adopts_each_version_that_many_steps_after_its_request(local_pool, monkeypatch, answered):
    """With adopt_after_steps 2 the version asked for at step s is adopted at s + 2, however fast the actors."""
    monkeypatch.setattr(local_pool, "answered", answered)
    model = tiny_gpt2()
    schedule = rank_zero_schedule(model, lag=2)
    train(schedule, model, range(20), {})
    assert [(a["version"], a["requested_at"], a["adopted_at"]) for a in schedule.adoptions] == [
        (1, 0, 0),
        (2, 4, 6),
        (3, 8, 10),
        (4, 12, 14),
        (5, 16, 18),
    ]


def test_without_a_lag_slow_actors_never_hold_up_training(local_pool, model):
    """With adopt_after_steps 0 (the default) a version that is not in yet is simply not adopted."""
    schedule = rank_zero_schedule(model, lag=0)
    train(schedule, model, range(20), {})
    assert [a["version"] for a in schedule.adoptions] == [1]


def test_a_checkpoint_between_request_and_adoption_resumes_into_the_same_sequence(local_pool):
    """Saved at step 10 with step 8's version in flight, the resumed run adopts it at 10 with the same labels,
    and every later version at the same step as an uninterrupted run."""
    reference_model, reference_labels = tiny_gpt2(), {}
    reference = rank_zero_schedule(reference_model, lag=2)
    train(reference, reference_model, range(20), reference_labels)

    model, labels = tiny_gpt2(), {}
    interrupted = rank_zero_schedule(model, lag=2)
    train(interrupted, model, range(10), labels)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), interrupted.state_dict()), buffer)  # as a checkpoint keeps them
    weights, state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert (state["pending"]["requested_at"], state["pending"]["adopt_at"]) == (8, 10)

    resumed_model = tiny_gpt2()
    resumed_model.load_state_dict(weights)
    resumed = rank_zero_schedule(resumed_model, lag=2)
    resumed.load_state_dict(state)
    train(resumed, resumed_model, range(10, 20), labels)
    assert resumed.adoptions == reference.adoptions
    assert labels == reference_labels and len({str(version) for version in labels.values()}) == 5

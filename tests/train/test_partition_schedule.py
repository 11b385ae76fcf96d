"""The partition schedule's state: what a checkpoint keeps, and what a resumed run does with it."""

import pytest
import torch
import transformers

from orchestrator.modularity import ClusterabilityRegularizer, clusterability, find_matrix_groups, partition_group
from orchestrator.spec import ModularitySpec, PartitionerSpec
from orchestrator.train.partition_schedule import PartitionSchedule
from orchestrator.train.partitioning import plain_partition


@pytest.fixture
def model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=16,
                                                                vocab_size=40))


def schedule_for(model, regularizer=None, **modularity) -> PartitionSchedule:
    """Rank 1 of a world that is not started: the schedule's own logic, no Ray, no collectives."""
    return PartitionSchedule(find_matrix_groups(model), regularizer or ClusterabilityRegularizer(),
                             ModularitySpec(**modularity), PartitionerSpec(), rank=1, device=torch.device("cpu"),
                             actor_names=(), metric_logger=None)


def saved_state(model) -> dict:
    partitions = {group.name: plain_partition(partition_group([m.weight() for m in group.inputs],
                                                              [m.weight() for m in group.outputs], 4, seed=1))
                  for group in find_matrix_groups(model)}
    return {"version": 3, "last_request": 20, "partitions": partitions,
            "adoptions": [{"version": 1, "requested_at": 0, "adopted_at": 0},
                          {"version": 2, "requested_at": 10, "adopted_at": 14},
                          {"version": 3, "requested_at": 20, "adopted_at": 23}]}


def test_state_round_trips_and_drives_the_regulariser(model):
    """A loaded state is the state saved (plain lists), and the regulariser measures C under its labels."""
    state, regularizer = saved_state(model), ClusterabilityRegularizer()
    schedule = schedule_for(model, regularizer)
    schedule.load_state_dict(state)
    assert schedule.state_dict() == state and schedule.version == 3
    regularizer.clear()
    model(torch.zeros(1, 4, dtype=torch.long))
    values = regularizer.values()
    for group in find_matrix_groups(model):
        labels = schedule.partitions[group.name].matrix_labels()
        for matrix, (rows, cols) in zip(group.matrices, labels):
            expected = clusterability(matrix.weight().detach(), rows, cols)
            assert float(values[matrix.name].detach()) == pytest.approx(float(expected))
            assert 0 < schedule.baselines[matrix.name] < 1


def test_resumed_run_keeps_its_partition_until_the_next_request_is_due(model):
    """Resumed after a request at step 20: every 10 steps asks again at 30, not before; every 0 never asks."""
    once = schedule_for(model, partition_every=0)
    once.load_state_dict(saved_state(model))
    for step in range(24, 60):
        assert once.maybe_repartition(step) is None
    assert once.state_dict()["last_request"] == 20

    periodic = schedule_for(model, partition_every=10)
    periodic.load_state_dict(saved_state(model))
    for step in range(25, 30):
        periodic.maybe_repartition(step)
    assert periodic.state_dict()["last_request"] == 20
    periodic.maybe_repartition(30)
    assert periodic.state_dict()["last_request"] == 30 and periodic.version == 3  # asked; not adopted yet

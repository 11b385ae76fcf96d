"""The learning-rate schedule: linear warm-up, then constant or cosine decay to the floor."""

import itertools
import math

import pytest
import torch

from orchestrator.spec import TrainingSpec
from orchestrator.train.schedule import lr_multiplier, scheduler_factory


def test_warmup_rises_linearly_to_full_lr():
    """During warm-up the factor climbs (step+1)/warmup and reaches exactly 1 at the first full step."""
    training = TrainingSpec(steps=100, warmup_steps=4, lr_schedule="constant")
    assert [lr_multiplier(step, training) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_full_lr_to_the_floor():
    """After warm-up, cosine starts at 1, halves its distance to the floor midway and ends at min_lr_ratio."""
    training = TrainingSpec(steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(10, training) == pytest.approx(1.0)
    assert lr_multiplier(60, training) == pytest.approx(0.55)
    assert lr_multiplier(110, training) == pytest.approx(0.1)
    values = [lr_multiplier(step, training) for step in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_scheduler_factory_drives_an_optimizer():
    """The factory DeepSpeed receives wraps an optimizer so that its lr follows the schedule step by step."""
    training = TrainingSpec(steps=20, lr=0.5, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.lr)
    scheduler = scheduler_factory(training)(optimizer)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:2] == [0.25, 0.5]
    assert seen[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))

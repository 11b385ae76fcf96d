"""The learning-rate schedule: linear warm-up, then constant or cosine decay to a floor.

DeepSpeed steps the scheduler once per optimizer step (not per micro-batch) and skips the step when fp16
overflows, so the schedule counts optimizer steps and is saved with every DeepSpeed checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from orchestrator.spec import TrainingSpec


def lr_multiplier(step: int, training: TrainingSpec) -> float:
    """The factor on ``training.lr`` at optimizer step ``step`` (0-based)."""
    warmup = training.warmup_steps
    if step < warmup:
        return (step + 1) / warmup  # never 0: the first step already learns
    if training.lr_schedule == "constant":
        return 1.0
    decay_steps = max(training.steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    floor = training.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(training: TrainingSpec) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: a callable that wraps whichever optimizer the
    engine ends up with (the client AdamW, or DeepSpeed's CPUAdam under offload on GPU)."""
    import torch

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, training))

    return build

"""Labelled examples (an input tensor and a class per example) and their per-rank, resumable streams.

The classification counterpart of packed token blocks: images with their digit or object class, or
modular-addition prompts with their sum. Like ``batch_stream``, a batch is a pure function of
(seed, rank, world_size, global batch, step), so a resumed run continues with the next unseen batch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from orchestrator.data.loader import epoch_length


@dataclass(frozen=True)
class LabelledExamples:
    inputs: torch.Tensor  # [n, ...]: pixels [n, C, H, W] (float) or tokens [n, T] (long)
    labels: torch.Tensor  # [n] class indices

    def __post_init__(self):
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | slice) -> LabelledExamples:
        return LabelledExamples(self.inputs[indices], self.labels[indices])

    __getitem__ = subset  # slices shard examples the way they shard token blocks


@dataclass(frozen=True)
class ExampleData:
    """What a classification source builds: training and validation examples, and the number of classes.

    ``vocab_size`` is set for token inputs (modular addition: the p numbers and '='), None for pixels.
    """

    train: LabelledExamples
    validation: LabelledExamples | None
    num_classes: int
    vocab_size: int | None = None
    validation_by_task: dict[str, LabelledExamples] = field(default_factory=dict)  # none: no task tags, unlike text


def split_examples(
    examples: LabelledExamples, validation_fraction: float, seed: int
) -> tuple[LabelledExamples, LabelledExamples | None]:
    """A seeded random hold-out of ``validation_fraction`` of the examples (none when the fraction is 0)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    held = round(len(examples) * validation_fraction)
    validation = examples.subset(order[:held]) if held else None
    return examples.subset(order[held:]), validation


def example_stream(
    examples: LabelledExamples,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    global_batch: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches {"inputs": [B, ...], "labels": [B]} forever, from micro-batch ``start_step``.

    Each epoch reshuffles all examples with ``seed + epoch`` and deals its whole global batches (see
    ``loader.epoch_length``) to the ranks in turn, so the ranks' shards are disjoint, each rank reads the same
    number of batches per epoch, and a group resized with the same global batch continues at the next unseen
    example. Checked at once, not at ``next``.
    """
    length = epoch_length(
        len(examples),
        micro_batch_size,
        rank,
        world_size,
        global_batch,
        "examples",
        "lower training.micro_batch_size or resources.num_workers, or hold out less for validation",
    )
    per_rank = length // world_size
    batches_per_epoch = per_rank // micro_batch_size

    @functools.lru_cache(maxsize=1)
    def shard(epoch: int) -> torch.Tensor:  # [per_rank] example indices, in reading order
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
        return order[:length][rank::world_size]

    def batch(step: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step, batches_per_epoch)
        rows = examples.subset(shard(epoch)[index * micro_batch_size : (index + 1) * micro_batch_size])
        return {"inputs": rows.inputs, "labels": rows.labels}

    return map(batch, itertools.count(start_step))

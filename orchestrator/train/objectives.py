"""What a training step optimises: next-token prediction (language models) or class prediction (classifiers).

The trainer's loop is the same for both; an objective says how to stream the data it needs, how to turn a
micro-batch into the task loss (plus metrics such as accuracy), and what throughput counts (tokens or samples).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

from orchestrator import metric_names

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Objective(Protocol):
    unit: str  # what throughput counts: "tokens" or "samples"

    def batches(
        self,
        examples,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int = 0,
        global_batch: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's resumable stream of micro-batches over the training split, in epochs of whole global
        batches (so a resized group continues at the next unseen item)."""

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task loss of one micro-batch (a differentiable scalar) and its detached metrics."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens or samples in the micro-batch."""

    def model_flops(self, model, examples) -> float:
        """Training FLOPs per item (token or sample), counted on one forward of a plain (not yet sharded) model."""


class CausalLanguageModelling:
    """Mean next-token cross-entropy over packed blocks [B, T + 1]."""

    unit = "tokens"

    def batches(self, blocks, micro_batch_size, rank, world_size, seed, start_step=0, global_batch=None):
        from orchestrator.data import batch_stream

        return batch_stream(blocks, micro_batch_size, rank, world_size, seed, start_step, global_batch)

    def loss(self, model, batch):
        input_ids = to_device(batch["input_ids"], _device(model))  # [B, T]
        labels = to_device(batch["labels"], input_ids.device)  # [B, T]
        logits = model(input_ids=input_ids).logits  # [B, T, vocab]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), {}

    def count(self, batch):
        return batch["input_ids"].numel()

    def model_flops(self, model, blocks):
        from orchestrator.train.throughput import flops_per_item

        return flops_per_item(model, {"input_ids": blocks[:1, :-1]}, items=blocks.shape[1] - 1)  # one sequence


class Classification:
    """Cross-entropy of one class per example, with the batch's accuracy; pixel inputs are cast to the
    precision the engine computes in (integer token inputs stay as they are)."""

    unit = "samples"

    def __init__(self, compute_dtype: torch.dtype):
        self.compute_dtype = compute_dtype

    def batches(self, examples, micro_batch_size, rank, world_size, seed, start_step=0, global_batch=None):
        from orchestrator.data.examples import example_stream

        return example_stream(examples, micro_batch_size, rank, world_size, seed, start_step, global_batch)

    def loss(self, model, batch):
        logits = model(**self._inputs(batch["inputs"], _device(model))).float()  # [B, classes]
        labels = to_device(batch["labels"], logits.device)  # [B]
        accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
        return torch.nn.functional.cross_entropy(logits, labels), {metric_names.ACCURACY: accuracy}

    def count(self, batch):
        return len(batch["labels"])

    def model_flops(self, model, examples):
        from orchestrator.train.throughput import flops_per_item

        return flops_per_item(model, self._inputs(examples.inputs[:1], _device(model), torch.float32), items=1)

    def _inputs(self, inputs: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> dict:
        inputs = to_device(inputs, device)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype or self.compute_dtype)
        return {"inputs": inputs}


def objective_for(spec: JobSpec) -> Objective:
    """Classification for image and modular-addition sources, next-token prediction for text."""
    from orchestrator.spec import TEXT_SOURCES

    if spec.data.source in TEXT_SOURCES:
        return CausalLanguageModelling()
    return Classification(_DTYPES[spec.training.precision])


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch tensor on ``device``; to a GPU from pinned memory without blocking the host, which then queues
    the step's kernels while the copy runs (a pageable copy makes the host wait for it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _device(model) -> torch.device:
    """The device a DeepSpeed engine (``.device``) or a plain module (its first parameter's) computes on."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device

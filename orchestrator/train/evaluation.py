"""Eval loss and perplexity (or accuracy) on the validation split every N steps, computed by all ranks together.

Every rank runs the forwards of its own equal share of each validation set (under ZeRO-3 a forward gathers
parameters, a collective, so every rank must run as many as the others), weights each micro-batch's loss
and metrics by its token or example count, and one ``all_reduce`` turns the sums into exact means over the
whole set. Rank 0 logs them. For the synthetic corpus each task's held-out blocks are a set of their own
(``eval/loss/<task>``), so later work can ask which model cluster each task depends on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from orchestrator import metric_names
from orchestrator.data.packing import split_inputs_and_labels
from orchestrator.train.due import due

if TYPE_CHECKING:
    from orchestrator.spec import EvaluationSpec
    from orchestrator.train.objectives import Objective


def rank_shard(items, rank: int, world_size: int):
    """This rank's equal, disjoint share of ``items`` (strided; the few left over by the division sit out)."""
    per_rank = len(items) // world_size
    return items[: per_rank * world_size][rank::world_size]


class Evaluator:
    """Computes the eval metrics when ``due``; every rank must call ``evaluate`` at the same steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        sets: dict,
        evaluation: EvaluationSpec,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        last_step: int,
        device: torch.device,
    ):
        self.model, self.objective, self.evaluation = model, objective, evaluation
        self.micro_batch_size, self.last_step, self.device = micro_batch_size, last_step, device
        self.shards = {name: rank_shard(items, rank, world_size) for name, items in sets.items()}
        too_small = [f"{name} ({len(sets[name])})" for name, shard in self.shards.items() if not len(shard)]
        if too_small and evaluation.every_steps:
            raise ValueError(
                f"validation sets {', '.join(too_small)} hold fewer items than the {world_size} ranks "
                "that evaluate a share each; hold out more validation data, or set "
                "evaluation.every_steps: 0"
            )

    def due(self, step: int) -> bool:
        """After every ``every_steps`` steps and after the last one, when evaluation is on and there is data."""
        every = self.evaluation.every_steps
        return bool(every and self.shards) and due(step, every, self.last_step)

    def evaluate(self) -> dict[str, float]:
        """Every set's mean loss (and the objective's metrics, e.g. accuracy) over all ranks; perplexity for text."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            sums = {name: self._sums(shard) for name, shard in self.shards.items()}  # name -> {metric: weighted sum}
        self.model.train(was_training)
        keys = [(name, metric) for name, metric_sums in sums.items() for metric in sorted(metric_sums)]
        totals = torch.tensor([sums[name][metric] for name, metric in keys], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        totals = dict(zip(keys, totals.tolist(), strict=True))
        metrics = {}
        for name, metric_sums in sums.items():
            count = totals[(name, _COUNT)]
            for metric in metric_sums.keys() - {_COUNT}:
                metrics[metric_names.eval_metric(name, metric)] = totals[(name, metric)] / count
        if metric_names.EVAL_LOSS in metrics and self.objective.unit == "tokens":
            # Capped below float overflow, so a diverged run logs a huge perplexity instead of failing.
            metrics[metric_names.EVAL_PERPLEXITY] = math.exp(min(metrics[metric_names.EVAL_LOSS], 700.0))
        return metrics

    def _sums(self, shard) -> dict[str, float]:
        """Count-weighted sums of the loss and the objective's metrics over this rank's batches, and the count."""
        sums: dict[str, float] = {_COUNT: 0.0}
        for batch in self._batches(shard):
            loss, extra = self.objective.loss(self.model, batch)
            count = self.objective.count(batch)
            for metric, value in {"loss": loss, **extra}.items():
                sums[metric] = sums.get(metric, 0.0) + float(value) * count
            sums[_COUNT] += count
        return sums

    def _batches(self, shard) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of the shard in a fixed order (the same subset each time when ``max_batches`` caps it)."""
        starts = range(0, len(shard), self.micro_batch_size)
        if self.evaluation.max_batches:
            starts = starts[: self.evaluation.max_batches]
        for start in starts:
            yield _batch(shard[start : start + self.micro_batch_size])


_COUNT = "count"  # tokens or examples behind the sums


def _batch(items) -> dict[str, torch.Tensor]:
    """The micro-batch an objective takes: token blocks give inputs and shifted labels; examples are labelled."""
    if isinstance(items, torch.Tensor):
        inputs, labels = split_inputs_and_labels(items.long())  # [B, T] each
        return {"input_ids": inputs, "labels": labels}
    return {"inputs": items.inputs, "labels": items.labels}

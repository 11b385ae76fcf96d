"""The scalable circuit finder: rank weights by integrated-gradient attribution and keep the smallest top set
that holds the task metric. Attribution-ranked weight pruning, not the exact greedy search: the report says so.

Scores come from integrated gradients over a joint scaling of the scoped weights, α = (k − 0.5)/K, k = 1..K:
`I_w = −w · mean_α ∂m/∂w(α·W)`, which add up (completeness) to m(scope zeroed) − m(model): the loss that
removing w is expected to add. The circuit keeping the top `ceil(q·|scope|)` weights is judged by its
faithfulness f(q) = (m_none − m_q) / (m_none − m_full) on a fixed grid of q; `size_at[τ]` is the smallest share
with f ≥ τ, refined by bisection between the grid points that bracket it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.locality import Locality, circuit_locality, resolve_partition
from orchestrator.circuits.masks import regularised_scope

GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BISECTION_STEPS = 6
Metric = Callable[[nn.Module, object], Tensor]  # (model, batch) -> scalar loss, lower is better


@dataclass(frozen=True)
class AttributionCircuit:
    method: str  # what produced it: attribution-ranked weight pruning, K, scores, data
    scores: dict[str, Tensor]  # per parameter, I_w (|I_w| when unsigned): the ranking
    full: float  # m(model)
    none: float  # m(scope zeroed)
    grid: tuple[float, ...]
    faithfulness: np.ndarray  # f at every grid share
    size_at: dict[float, float]  # τ -> kept share of the scope (count / |scope|) of the smallest circuit with f ≥ τ
    masks: dict[float, dict[str, Tensor]]  # τ -> parameter -> bool, True = kept
    sizes_at: dict[float, dict[str, float]]  # τ -> parameter -> kept share of that matrix
    locality: dict[float, Locality] | None  # τ -> locality under the partition
    cpr: float  # ∫ f dq over the grid (higher is better)
    cmd: float  # ∫ |1 − f| dq over the grid (lower is better)
    curve: dict[int, float]  # every evaluated kept count -> f

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a tracker, keyed under the task: size and locality per τ, CPR, CMD, the metric of
        the full model and of the zeroed scope."""
        values = {"cpr": self.cpr, "cmd": self.cmd, "metric_full": self.full, "metric_none": self.none}
        values |= {f"size/tau_{tau:g}": size for tau, size in self.size_at.items()}
        return values | {f"locality/tau_{tau:g}": local.share for tau, local in (self.locality or {}).items()}


def attribution_weight_circuit(
    model: nn.Module,
    batches: Sequence,
    metric: Metric,
    params: Sequence[str] | None = None,
    ig_steps: int = 8,
    taus: Iterable[float] = (0.8, 0.9, 0.95, 1.0),
    signed: bool = True,
    eval_batches: Sequence | None = None,
    partition: Mapping | None = None,
) -> AttributionCircuit:
    """Circuits of one task for every τ: scores on `batches`, faithfulness on `eval_batches` (default the same
    batches, as the papers judge circuits on the data that chose them). `params` default: the regularised
    matrices (a transformer's MLP in/out projections; never embeddings, unembedding or norms), or every
    nn.Linear weight of a model without MLP groups. The model is restored."""
    taus = check_taus(ig_steps, taus)
    parameters = scoped_parameters(model, params)
    scores = integrated_gradient_scores(model, parameters, batches, metric, ig_steps, signed)
    judged = eval_batches if eval_batches is not None else batches
    size = sum(score.numel() for score in scores.values())
    judge = Faithfulness(WholeModelMasking(model, parameters, scores, judged, metric), size)
    faithfulness, counts = judge.grid_and_counts(taus)
    masks = {tau: top_mask(scores, count) for tau, count in counts.items()}
    labels = resolve_partition(model, partition)
    return judged_circuit(
        method_line(ig_steps, signed, taus, len(parameters), len(batches), eval_batches),
        scores,
        judge,
        faithfulness,
        counts,
        masks,
        sizes_at={tau: {name: float(m.double().mean()) for name, m in mask.items()} for tau, mask in masks.items()},
        locality=None if labels is None else {tau: circuit_locality(mask, labels) for tau, mask in masks.items()},
    )


def judged_circuit(
    method: str,
    scores: dict[str, Tensor],
    judge: Faithfulness,
    faithfulness: np.ndarray,
    counts: Mapping[float, int],
    masks: dict[float, dict[str, Tensor]],
    sizes_at: dict[float, dict[str, float]],
    locality: dict[float, Locality] | None,
) -> AttributionCircuit:
    """The circuit record from a judged scope, wherever its weights are held: sizes as shares of the scope,
    CPR and CMD as areas under the faithfulness grid."""
    return AttributionCircuit(
        method=method,
        scores=scores,
        full=judge.full,
        none=judge.none,
        grid=GRID,
        faithfulness=faithfulness,
        size_at={tau: count / judge.size for tau, count in counts.items()},
        masks=masks,
        sizes_at=sizes_at,
        locality=locality,
        cpr=float(np.trapezoid(faithfulness, GRID)),
        cmd=float(np.trapezoid(np.abs(1 - faithfulness), GRID)),
        curve=dict(sorted(judge.cache.items())),
    )


def check_taus(ig_steps: int, taus: Iterable[float]) -> tuple[float, ...]:
    """The taus in ascending order; refuses no taus, one outside (0, 1] or fewer than one IG step."""
    taus = tuple(sorted(taus))
    if ig_steps < 1 or not taus or not all(0 < tau <= 1 for tau in taus):
        raise ValueError(f"attribution_weight_circuit: need ig_steps >= 1 and taus in (0, 1], got {ig_steps}, {taus}")
    return taus


def method_line(
    ig_steps: int, signed: bool, taus: tuple[float, ...], matrices: int, batches: int, eval_batches: Sequence | None
) -> str:
    """What produced a circuit, for its report."""
    data = "the same data" if eval_batches is None else f"{len(eval_batches)} held-out batches"
    return (
        f"attribution-ranked weight pruning: integrated gradients, K={ig_steps} steps, "
        f"{'signed' if signed else 'absolute'} scores, τ {taus}, {matrices} matrices, "
        f"scored on {batches} batches, judged on {data}"
    )


def scoped_parameters(model: nn.Module, params: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """The scope by name: `params`, or the regularised matrices when None; refuses a name the model lacks."""
    available = dict(model.named_parameters())
    names = list(regularised_scope(model) if params is None else params)
    missing = [name for name in names if name not in available]
    if missing or not names:
        raise ValueError(f"attribution_weight_circuit: no parameter(s) {missing or 'given'} in {type(model).__name__}")
    return {name: available[name] for name in names}


def integrated_gradient_scores(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    batches: Sequence,
    metric: Metric,
    steps: int,
    signed: bool = True,
) -> dict[str, Tensor]:
    """`I_w = −w · ḡ_w` per scoped weight (float32 or wider), ḡ the gradient averaged over `steps` scalings of
    the scope, each over all `batches`; `|I_w|` when not `signed`. Other parameters get no gradient."""
    originals = {name: p.detach().clone() for name, p in parameters.items()}
    grads = {
        name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for name, p in parameters.items()
    }
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        for p in parameters.values():
            p.requires_grad_(True)
        for step in range(1, steps + 1):
            _scale(parameters, originals, (step - 0.5) / steps)
            for batch in batches:
                gradients = torch.autograd.grad(metric(model, batch) / len(batches), list(parameters.values()))
                for name, gradient in zip(parameters, gradients, strict=True):
                    grads[name] += gradient / steps
    finally:
        _scale(parameters, originals, 1.0)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    scores = {name: -originals[name].to(grads[name].dtype) * grads[name] for name in parameters}
    return scores if signed else {name: score.abs() for name, score in scores.items()}


def _scale(parameters: Mapping[str, nn.Parameter], originals: Mapping[str, Tensor], alpha: float) -> None:
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(originals[name] * alpha if alpha != 1.0 else originals[name])


def global_threshold(scores: Iterable[Tensor], count: int) -> float:
    """The `count`-th largest score over all matrices: the cut of a global top-`count`. A sharded model can
    compute the same from a gathered quantile or histogram of its shards' scores."""
    flat = torch.cat([score.detach().reshape(-1).cpu() for score in scores])
    return float(torch.kthvalue(flat, len(flat) - count + 1).values) if count else math.inf


def top_mask(scores: Mapping[str, Tensor], count: int, threshold: float | None = None) -> dict[str, Tensor]:
    """Exactly `count` kept weights: all scores above the threshold (`global_threshold` unless given), then
    ties at it in parameter order."""
    threshold = global_threshold(scores.values(), count) if threshold is None else threshold
    masks = {name: score > threshold for name, score in scores.items()}
    ties_left = count - sum(int(mask.sum()) for mask in masks.values())
    for name, score in scores.items():
        if ties_left <= 0:
            break
        tied = (score == threshold).reshape(-1)
        tied &= tied.cumsum(0) <= ties_left
        ties_left -= int(tied.sum())
        masks[name] |= tied.reshape(score.shape)
    return masks


def masked_metric(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    mask: Mapping[str, Tensor],
    batches: Sequence,
    metric: Metric,
    originals: Mapping[str, Tensor] | None = None,
) -> float:
    """Mean metric over `batches` with the scope's unkept weights zeroed; the weights are restored after, from
    `originals` when the caller keeps a copy (saves one copy of the scope per call)."""
    originals = originals or {name: p.detach().clone() for name, p in parameters.items()}
    try:
        with torch.no_grad():
            for name, p in parameters.items():
                p.mul_(mask[name].to(p.device, p.dtype))
            return float(sum(float(metric(model, batch)) for batch in batches) / len(batches))
    finally:
        _scale(parameters, originals, 1.0)


class WholeModelMasking:
    """Mean metric of the top-`count` circuit of a model held whole in this process."""

    def __init__(self, model, parameters, scores, batches, metric):
        self.model, self.parameters, self.scores, self.batches, self.metric = model, parameters, scores, batches, metric
        self.originals = {name: p.detach().clone() for name, p in parameters.items()}
        flat = torch.cat([score.detach().reshape(-1).cpu() for score in scores.values()])
        self.ascending = np.sort(flat.numpy())  # one sort serves every count's threshold (numpy's: ~7x torch's)

    def __call__(self, count: int) -> float:
        threshold = float(self.ascending[len(self.ascending) - count]) if count else math.inf
        return masked_metric(
            self.model,
            self.parameters,
            top_mask(self.scores, count, threshold),
            self.batches,
            self.metric,
            self.originals,
        )


class Faithfulness:
    """f of the top-`count` circuit of a scope of `size` weights, each count evaluated once by `metric_at`
    (count -> mean metric with only the top `count` weights kept), however the weights are held."""

    def __init__(self, metric_at: Callable[[int], float], size: int):
        self.metric_at, self.size = metric_at, size
        self.full = metric_at(size)
        self.none = metric_at(0)
        if not self.none > self.full:
            raise ValueError(
                f"attribution_weight_circuit: zeroing the scope does not hurt the task (metric "
                f"{self.none:.4g} without it, {self.full:.4g} with it); faithfulness is undefined"
            )
        self.cache: dict[int, float] = {0: 0.0, self.size: 1.0}

    def count(self, share: float) -> int:
        return min(self.size, math.ceil(share * self.size - 1e-9))

    def at_count(self, count: int) -> float:
        if count not in self.cache:
            self.cache[count] = (self.none - self.metric_at(count)) / (self.none - self.full)
        return self.cache[count]

    def at_share(self, share: float) -> float:
        return self.at_count(self.count(share))

    def grid_and_counts(self, taus: Iterable[float]) -> tuple[np.ndarray, dict[float, int]]:
        """f at every `GRID` share, and per τ the kept count of the smallest circuit with f ≥ τ."""
        faithfulness = np.array([self.at_share(share) for share in GRID])
        return faithfulness, {tau: self.smallest_count(tau, faithfulness) for tau in taus}

    def smallest_count(self, tau: float, faithfulness: np.ndarray) -> int:
        """Kept count of the smallest grid share with f ≥ τ, narrowed by bisection from the grid point below."""
        first = int(np.argmax(faithfulness >= tau))  # f(1.0) = 1 >= τ, so some grid point qualifies
        low, high = (GRID[first - 1] if first else 0.0), GRID[first]
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if self.at_share(middle) >= tau:
                high = middle
            else:
                low = middle
        return self.count(high)

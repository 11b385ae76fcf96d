"""The exact per-weight circuit finder: visit the scoped weights one by one, zero each, and keep it zeroed
unless the task's loss (and optionally accuracy) gets worse by more than float64 rounding of the loss.

Two criteria. `reference="original"` compares with the unpruned model's loss, strictly (`L - L0 > 0` restores),
as the papers' code does; removing weights that feed rival logits lowers the loss and builds slack that later
removals of the true circuit may use up, so it can return degenerate circuits (even an empty one when the model
is not confident on the label). `reference="current"` (the default) compares with the loss after the removals
accepted so far, as ACDC does, and keeps every weight whose removal costs anything.
Evaluation is in float64, so a weight whose removal changes no activation keeps the loss exactly and is pruned.
A model that ends in a chain of linear layers covering the scope is evaluated by the chain's cache (only the
examples a removal moves are recomputed); any other traceable classifier (residual streams, attention heads,
embeddings: the modular-addition transformer) by its traced graph's cache (only the nodes downstream of the
pruned layer are recomputed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.chain import find_linear_chain
from orchestrator.circuits.chain_state import ChainState
from orchestrator.circuits.graph_state import GraphState
from orchestrator.circuits.locality import Locality, circuit_locality, resolve_partition
from orchestrator.circuits.masks import apply_mask, classifier_score, default_scope

REFERENCES = ("current", "original")
ROUNDING_ULPS = 16  # a loss change within this many float64 spacings of the loss is rounding, not an effect
ORDERS = ("paper", "random", "ascending")


@dataclass(frozen=True)
class TaskScore:
    loss: float  # mean cross-entropy
    accuracy: float


@dataclass(frozen=True)
class Circuit:
    """What the greedy finder keeps. `size` is the effective circuit size: the share of scoped weights left
    non-zero, unrounded (the papers round it to 3 decimals); weights that were zero before count as pruned."""

    mask: dict[str, Tensor]  # parameter name -> bool, True = kept; in the parameter's own shape
    size: float
    sizes: dict[str, float]  # per parameter
    zero_before: int
    full: TaskScore  # the unpruned model on the task data
    task: TaskScore  # the circuit on the task data
    other: dict[str, TaskScore]  # the circuit on other data sets, by name
    locality: Locality | None
    method: str

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a tracker, keyed by name under the task (a caller prefixes them, e.g. with
        `circuits/<task>/`): size, per-matrix size, the circuit's and the full model's loss and accuracy,
        locality, and the circuit's score on each other data set."""
        values = {
            "size": self.size,
            "zero_before": float(self.zero_before),
            "loss": self.task.loss,
            "accuracy": self.task.accuracy,
            "full_loss": self.full.loss,
            "full_accuracy": self.full.accuracy,
        }
        values |= {f"size/{name}": size for name, size in self.sizes.items()}
        values |= {f"other/{name}/loss": score.loss for name, score in self.other.items()}
        values |= {f"other/{name}/accuracy": score.accuracy for name, score in self.other.items()}
        return values | ({"locality": self.locality.share} if self.locality else {})


def greedy_weight_circuit(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[str] | None = None,
    reference: str = "current",
    order: str = "paper",
    eps: float = 0.0,
    also_accuracy: bool = False,
    partition: Mapping | None = None,
    seed: int = 0,
    other: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> Circuit:
    """The circuit of one task (`inputs`, `targets`: e.g. the test examples of one label).

    `params`: weight names to prune (default every nn.Linear weight: biases, convolutions and embeddings stay);
    `order`: "paper" (last layer first, each matrix row-major), "random" (a permutation drawn from `seed`) or
    "ascending" (smallest |w| first); a removal is undone when `L - L_ref > eps·|L0|`, or, with `also_accuracy`,
    when the accuracy falls below the unpruned model's. `partition`: group partitions by group name or
    `MatrixLabels` by parameter name, for locality; `other`: named (inputs, targets) to score the circuit on.
    The model is not modified."""
    _check_options(reference, order, eps)
    scope = list(default_scope(model) if params is None else params)
    state, names = _evaluator(model, inputs, targets, scope)
    scoped = _scoped_layers(names, scope)
    full = TaskScore(state.loss, state.accuracy)
    original = [state.weights[layer].copy() for layer in range(len(names))]
    for layer, unit, source in _visit_order(state, scoped, order, seed):
        _try_pruning(state, layer, unit, source, full, reference, eps, also_accuracy)
    mask = {f"{names[layer]}.weight": torch.from_numpy(state.weights[layer] != 0) for layer in scoped}
    zero_before = sum(int((original[layer] == 0).sum()) for layer in scoped)
    labels = resolve_partition(model, partition)
    pruned = apply_mask(model, mask) if other else None
    return Circuit(
        mask=mask,
        size=_kept_share(mask.values()),
        sizes={name: _kept_share([m]) for name, m in mask.items()},
        zero_before=zero_before,
        full=full,
        task=TaskScore(state.loss, state.accuracy),
        other={name: TaskScore(*classifier_score(pruned, x, y)) for name, (x, y) in (other or {}).items()},
        locality=None if labels is None else circuit_locality(mask, labels),
        method=f"greedy per-weight pruning: reference={reference}, order={order}"
        f"{f'(seed={seed})' if order == 'random' else ''}, eps={eps}, "
        f"{'loss and accuracy' if also_accuracy else 'loss only'}, float64, {len(targets)} examples",
    )


def _check_options(reference: str, order: str, eps: float) -> None:
    if reference not in REFERENCES:
        raise ValueError(f"greedy_weight_circuit: reference must be one of {REFERENCES}, got {reference!r}")
    if order not in ORDERS:
        raise ValueError(f"greedy_weight_circuit: order must be one of {ORDERS}, got {order!r}")
    if eps < 0:
        raise ValueError(f"greedy_weight_circuit: eps is a tolerance and must be >= 0, got {eps}")


def _evaluator(
    model: nn.Module, inputs: Tensor, targets: Tensor, scope: list[str]
) -> tuple[ChainState | GraphState, list[str]]:
    """The chain's cache when the model ends in a linear chain holding every scoped weight (faster: it recomputes
    only the examples a removal moves), else the traced graph's; with the module names of its layers."""
    try:
        chain = find_linear_chain(model)
    except ValueError:
        chain = None
    if chain is not None and set(scope) <= {f"{name}.weight" for name in chain.names}:
        return ChainState.from_model(model, chain, inputs, targets), chain.names
    state = GraphState(model, inputs, targets)
    return state, state.names


def _scoped_layers(names: list[str], scope: list[str]) -> list[int]:
    """Layer positions of the scoped weights; every scoped weight must be an nn.Linear's."""
    positions = {f"{name}.weight": layer for layer, name in enumerate(names)}
    outside = [name for name in scope if name not in positions]
    if outside or not scope:
        raise ValueError(
            f"greedy_weight_circuit prunes the weights of the model's nn.Linear layers {list(positions)} only; "
            f"not among them: {outside or 'no parameters were given'}"
        )
    return sorted(positions[name] for name in scope)


def _visit_order(
    state: ChainState | GraphState, scoped: list[int], order: str, seed: int
) -> list[tuple[int, int, int]]:
    """(layer, unit, source) of every scoped weight; "paper" is the last layer first, rows then columns."""
    visits = [
        (layer, unit, source) for layer in reversed(scoped) for unit, source in np.ndindex(*state.weights[layer].shape)
    ]
    if order == "random":
        permutation = np.random.default_rng(seed).permutation(len(visits))
        return [visits[index] for index in permutation]
    if order == "ascending":
        magnitudes = np.concatenate([np.abs(state.weights[layer]).ravel() for layer in reversed(scoped)])
        return [visits[index] for index in np.argsort(magnitudes, kind="stable")]
    return visits


def _try_pruning(
    state: ChainState | GraphState,
    layer: int,
    unit: int,
    source: int,
    full: TaskScore,
    reference: str,
    eps: float,
    also_accuracy: bool,
) -> None:
    """Zero the weight unless that makes the loss worse than the reference by more than eps·|L0| (or, with
    `also_accuracy`, the accuracy worse than the unpruned model's). The change is judged on the examples it
    moves, so it is exact even where the mean loss is far larger than the change."""
    if state.weights[layer][unit, source] == 0:
        return
    removal = state.try_removal(layer, unit, source)
    above_reference = removal.loss_change + (state.loss - full.loss if reference == "original" else 0.0)
    tolerance = max(eps * abs(full.loss), rounding(full.loss, state.loss))
    if above_reference > tolerance or (also_accuracy and state.accuracy_after(removal) < full.accuracy):
        return
    state.commit(removal)


def rounding(*losses: float) -> float:
    """The float64 resolution of a mean loss of this size: the same removal judged by a patched cache or by a
    full forward differs by about this much (a weight into a unit that no later weight reads can show 2e-17 on a
    loss of 1.8 through the one and 0 through the other), so a change below it is no change."""
    return ROUNDING_ULPS * float(np.spacing(max(abs(loss) for loss in losses)))


def _kept_share(masks) -> float:
    masks = list(masks)
    return float(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))

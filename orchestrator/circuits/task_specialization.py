"""Specialization measured on a model: cluster ablations per task turned into damage and sufficiency matrices,
with the specialization index's null (random partitions of the same sizes), bootstrap interval, and the
papers' per-sample dependence histogram."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.ablation import (
    MODES,
    Evaluate,
    HiddenLayer,
    TaskAblation,
    ablate_tasks,
    classifier_examples,
    mean_activations,
)
from orchestrator.circuits.specialization import (
    Dependence,
    NullModel,
    Specialization,
    cluster_specialization,
    specialization_index,
)

SCOPES = ("layer", "module")


def ablation_specialization(
    model: nn.Module,
    layers: Sequence[HiddenLayer],
    tasks: Mapping[str, tuple[Tensor, Tensor]],
    mode: str = "zero",
    scope: str = "layer",
    evaluate: Evaluate = classifier_examples,
    null_draws: int = 20,
    bootstraps: int = 1000,
    seed: int = 0,
    mean_inputs: Sequence[Tensor] | None = None,
    batch_size: int = 1024,
) -> dict[str, Specialization]:
    """Specialization of the clusters of each hidden layer (`scope="layer"`, keyed by module) or of "module i" =
    cluster i in every layer at once (`scope="module"`, key "module"), on held-out task data.

    `evaluate(model, inputs, targets)` gives per-example scores (higher is better; default −cross-entropy, since
    with accuracy all logits tie once every cluster is off) and correctness. `mode`: ablate to zero, or to the
    mean over `mean_inputs` (default: every task's inputs)."""
    _check_options(layers, mode, scope)
    was_training = model.training
    model.eval()
    try:
        inputs = mean_inputs if mean_inputs is not None else [x for x, _ in tasks.values()]
        fills = (
            mean_activations(model, layers, inputs, batch_size)
            if mode == "mean"
            else [torch.zeros(len(layer.labels)) for layer in layers]
        )
        units = [[index] for index in range(len(layers))] if scope == "layer" else [list(range(len(layers)))]
        results = {}
        for chosen in units:
            subset, subset_fills = [layers[i] for i in chosen], [fills[i] for i in chosen]
            k = int(max(int(layer.labels.max()) for layer in subset)) + 1
            ablation = ablate_tasks(model, subset, tasks, k, subset_fills, evaluate, batch_size)
            rng = np.random.default_rng(seed)
            null = _null(model, subset, tasks, k, subset_fills, evaluate, batch_size, ablation, null_draws, rng)
            key = subset[0].module if scope == "layer" else "module"
            results[key] = _specialization(ablation, null, bootstraps, rng)
        return results
    finally:
        model.train(was_training)


def _check_options(layers: Sequence[HiddenLayer], mode: str, scope: str) -> None:
    if mode not in MODES:
        raise ValueError(f"ablation_specialization: mode must be one of {MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"ablation_specialization: scope must be one of {SCOPES}, got {scope!r}")
    if not layers:
        raise ValueError("ablation_specialization: no hidden layers to ablate")
    ks = {int(layer.labels.max()) + 1 for layer in layers}
    if scope == "module" and len(ks) > 1:
        raise ValueError(
            f"ablation_specialization: scope 'module' pairs cluster i across layers, but the layers "
            f"have {sorted(ks)} clusters; use scope 'layer'"
        )


def damage_matrices(ablation: Mapping[str, TaskAblation]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Necessity D `[k, T]`, sufficiency R `[k, T]`, and which tasks are usable: those whose full − none gap
    is at least two standard errors (otherwise the ratios are noise)."""
    means = [_means(task) for task in ablation.values()]
    damage = np.stack([_damage(*mean) for mean in means], axis=1)
    sufficiency = np.stack([_sufficiency(*mean) for mean in means], axis=1)
    used = np.array([_gap_is_real(task) for task in ablation.values()])
    return damage, sufficiency, used


def _means(task: TaskAblation, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, ...]:
    """full, none `[...]` and off, on `[..., k]` means over the examples `rows` (`[B, n]` for B resamples)."""
    return (
        task.full[rows].mean(axis=-1),
        task.none[rows].mean(axis=-1),
        np.moveaxis(task.off[:, rows].mean(axis=-1), 0, -1),
        np.moveaxis(task.on[:, rows].mean(axis=-1), 0, -1),
    )


def _damage(full, none, off, _on) -> np.ndarray:
    return np.maximum(0.0, _share_of_gap(full[..., None] - off, full - none))


def _sufficiency(full, none, _off, on) -> np.ndarray:
    return np.clip(_share_of_gap(on - none[..., None], full - none), 0.0, 1.0)


def _share_of_gap(change: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """`change` `[..., k]` as a share of the full − none `gap` `[...]`; 0 where there is no gap to share."""
    gap = np.broadcast_to(np.asarray(gap)[..., None], change.shape)
    return np.divide(change, gap, out=np.zeros(change.shape), where=gap > 0)


def _gap_is_real(task: TaskAblation) -> bool:
    difference = task.full - task.none
    error = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else 0.0
    return bool(difference.mean() > 0 and difference.mean() >= 2 * error)


def _specialization(
    ablation: Mapping[str, TaskAblation], null: NullModel | None, bootstraps: int, rng: np.random.Generator
) -> Specialization:
    damage, sufficiency, used = damage_matrices(ablation)
    point = cluster_specialization(damage, tuple(ablation), sufficiency, used)
    null = None if null is None else _with_z(null, point.index)
    interval = _bootstrap_interval(ablation, point.used, bootstraps, rng) if bootstraps else None
    return Specialization(
        point.tasks,
        damage,
        point.index,
        point.concentration,
        point.used,
        sufficiency,
        point.sufficiency_index,
        interval,
        null,
        dependence(ablation, bootstraps, rng),
    )


def _bootstrap_interval(
    ablation: Mapping[str, TaskAblation], used: np.ndarray, bootstraps: int, rng: np.random.Generator
) -> tuple[float, float] | None:
    """95 % interval of SI over resamples of each task's examples (the tasks in the index stay fixed)."""
    tasks = [task for task, keep in zip(ablation.values(), used, strict=True) if keep]
    if not tasks:
        return None
    columns = [
        _damage(*_means(task, rng.integers(0, len(task.full), (bootstraps, len(task.full))))) for task in tasks
    ]  # each [B, k]
    values = specialization_index(np.stack(columns, axis=-1))  # [B]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def _null(model, layers, tasks, k, fills, evaluate, batch_size, ablation, draws, rng) -> NullModel | None:
    """SI of `draws` random relabellings of every layer's units (cluster sizes kept)."""
    if not draws:
        return None
    _, _, used = damage_matrices(ablation)
    values = []
    for _ in range(draws):
        shuffled = [
            HiddenLayer(layer.module, layer.labels[torch.from_numpy(rng.permutation(len(layer.labels)))], layer.at)
            for layer in layers
        ]
        damage, _, _ = damage_matrices(ablate_tasks(model, shuffled, tasks, k, fills, evaluate, batch_size))
        values.append(cluster_specialization(damage, used=used).index)
    values = np.array(values)
    defined = values[~np.isnan(values)]  # a draw whose damage no task feels has no index
    mean = float(defined.mean()) if len(defined) else float("nan")
    sd = float(defined.std(ddof=1)) if len(defined) > 1 else float("nan")
    return NullModel(values, mean, sd, float("nan"))


def _with_z(null: NullModel, index: float) -> NullModel:
    """z is undefined (NaN) where the index or the null's spread is; a null without spread puts any other index
    infinitely far from it."""
    if np.isnan(index) or np.isnan(null.sd) or (null.sd == 0 and index == null.mean):
        z = float("nan")
    elif null.sd == 0:
        z = float(np.copysign(np.inf, index - null.mean))
    else:
        z = (index - null.mean) / null.sd
    return NullModel(null.values, null.mean, null.sd, z)


def dependence(
    ablation: Mapping[str, TaskAblation], bootstraps: int = 1000, rng: np.random.Generator | None = None
) -> Dependence:
    """N(x) histogram and per-cluster break frequencies over every task's examples that the full model gets
    right, with bootstrap standard errors over those examples."""
    full_correct = np.concatenate([task.full_correct for task in ablation.values()])
    broken = np.concatenate([task.full_correct & ~task.off_correct for task in ablation.values()], axis=1)
    broken = broken[:, full_correct]  # [k, correct examples]
    k = broken.shape[0]
    histogram, per_cluster = _dependence_shares(broken)
    rng = rng or np.random.default_rng(0)
    resamples = [
        _dependence_shares(broken[:, rng.integers(0, broken.shape[1], broken.shape[1])])
        for _ in range(bootstraps if broken.shape[1] else 0)
    ]
    errors = (
        (np.std([h for h, _ in resamples], axis=0), np.std([c for _, c in resamples], axis=0))
        if resamples
        else (np.full(k, np.nan), np.full(k, np.nan))
    )
    affected = int((broken.sum(axis=0) > 0).sum())
    return Dependence(int(full_correct.sum()), affected / max(broken.shape[1], 1), histogram, per_cluster, *errors)


def _dependence_shares(broken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of affected examples with N = 1..k, and per cluster, from `broken` `[k, n]`."""
    counts = broken.sum(axis=0)  # [n]: N(x)
    affected = counts > 0
    if not affected.any():
        return np.zeros(broken.shape[0]), np.zeros(broken.shape[0])
    histogram = np.bincount(counts[affected], minlength=broken.shape[0] + 1)[1:] / affected.sum()
    return histogram, broken[:, affected].mean(axis=1)

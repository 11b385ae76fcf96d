"""Cluster ablation: switch off (or keep only) one cluster's hidden neurons and score every task's examples.

A hidden layer is reached through a forward hook on the module it flows through: the input of an MLP's
out-projection (`at="input"`: xcm's fc layers, GPT-2's `mlp.c_proj`, Pythia's `dense_4h_to_h`, Gemma's
`down_proj`) or the output of an activation module (`at="output"`). Ablating the post-activation, to zero or
to its mean over reference inputs, equals the papers' pre-activation zeroing for ReLU and GELU and also works
for gated MLPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.modularity.partition import GroupPartition
from orchestrator.modularity.weight_graphs import find_matrix_groups

MODES = ("zero", "mean")
Evaluate = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class HiddenLayer:
    module: str  # module path
    labels: Tensor  # [d_hidden] cluster of every hidden neuron
    at: Literal["input", "output"] = "input"  # the hidden layer is this module's input, or its output


@dataclass(frozen=True)
class TaskAblation:
    """Per-example scores (higher is better) and correctness of one task under every condition."""

    full: np.ndarray  # [n]
    none: np.ndarray  # [n]: every cluster ablated
    off: np.ndarray  # [k, n]: cluster i ablated
    on: np.ndarray  # [k, n]: only cluster i kept
    full_correct: np.ndarray  # [n] bool
    off_correct: np.ndarray  # [k, n] bool


def classifier_examples(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example −cross-entropy and correctness of a classifier's logits `[N, classes]`."""
    logits = model(inputs)
    targets = targets.long().to(logits.device)
    score = -nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    return score, logits.argmax(dim=-1) == targets


def hidden_layers(model: nn.Module, partitions: Mapping[str, GroupPartition]) -> list[HiddenLayer]:
    """One hidden layer per partitioned group: the input of its (first) out-projection, labelled by the
    group's hidden partition."""
    groups = {group.name: group for group in find_matrix_groups(model)}
    layers = []
    for name, partition in partitions.items():
        if name not in groups or not groups[name].outputs:
            raise ValueError(
                f"hidden_layers: {type(model).__name__} has no group {name!r} with an out-projection "
                f"to hook (groups: {sorted(groups)}); pass HiddenLayer(module, labels) directly"
            )
        layers.append(HiddenLayer(groups[name].outputs[0].name, partition.hidden.cpu()))
    return layers


def paper_module_labels(d_hidden: int, width: int = 256, modules: int = 4) -> Tensor:
    """The papers' GPT-2/Pythia modules, for reproducing their figure only: `width`-wide slices from unit 0, the
    last module taking every unit after `(modules − 1)·width` (768:3072 on GPT-2). They are not the trained
    clusters (GPT-2's are 768 wide), so they are never the default."""
    if d_hidden <= (modules - 1) * width:
        raise ValueError(
            f"paper_module_labels: {modules} modules of width {width} need more than "
            f"{(modules - 1) * width} hidden units, got {d_hidden}"
        )
    return (torch.arange(d_hidden) // width).clamp(max=modules - 1)


@contextmanager
def ablated(
    model: nn.Module, layers: Sequence[HiddenLayer], kept: Sequence[Tensor], fills: Sequence[Tensor]
) -> Iterator[None]:
    """Within the block, hidden neuron j of `layers[l]` is replaced by `fills[l][j]` where `kept[l][j]` is False."""
    handles = []
    for layer, keep, fill in zip(layers, kept, fills, strict=True):
        module = model.get_submodule(layer.module)

        def replace(hidden: Tensor, keep=keep, fill=fill) -> Tensor:  # [..., d_hidden]
            mask = keep.to(hidden.device)
            return torch.where(mask, hidden, fill.to(hidden.device, hidden.dtype))

        if layer.at == "input":
            handles.append(
                module.register_forward_pre_hook(lambda _m, args, replace=replace: (replace(args[0]), *args[1:]))
            )
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, output, replace=replace: replace(output)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mean_activations(
    model: nn.Module, layers: Sequence[HiddenLayer], inputs: Sequence[Tensor], batch_size: int
) -> list[Tensor]:
    """Each hidden layer's mean over `inputs` (every example and position): `[d_hidden]` per layer."""
    sums, counts, handles = [0.0] * len(layers), [0] * len(layers), []
    for index, layer in enumerate(layers):

        def record(hidden: Tensor, index=index) -> None:
            flat = hidden.detach().double().reshape(-1, hidden.shape[-1])
            sums[index] = sums[index] + flat.sum(dim=0)
            counts[index] += flat.shape[0]

        module = model.get_submodule(layer.module)
        handles.append(
            module.register_forward_pre_hook(lambda _m, args, record=record: record(args[0]))
            if layer.at == "input"
            else module.register_forward_hook(lambda _m, _args, output, record=record: record(output))
        )
    try:
        with torch.no_grad():
            for batch in inputs:
                for start in range(0, len(batch), batch_size):
                    model(batch[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return [total / count for total, count in zip(sums, counts, strict=True)]


def ablate_tasks(
    model: nn.Module,
    layers: Sequence[HiddenLayer],
    tasks: Mapping[str, tuple[Tensor, Tensor]],
    k: int,
    fills: Sequence[Tensor],
    evaluate: Evaluate = classifier_examples,
    batch_size: int = 1024,
) -> dict[str, TaskAblation]:
    """Every task under: no ablation, all clusters off, each cluster off, each cluster alone on; cluster i is
    switched in all of `layers` at once (pass one layer for the per-layer analysis)."""

    def condition(kept_clusters: Tensor | None) -> list[tuple[np.ndarray, np.ndarray]]:
        kept = [
            torch.ones_like(layer.labels, dtype=torch.bool)
            if kept_clusters is None
            else kept_clusters[layer.labels.long()]
            for layer in layers
        ]
        with ablated(model, layers, kept, fills):
            return [_evaluate_all(model, inputs, targets, evaluate, batch_size) for inputs, targets in tasks.values()]

    identity = torch.eye(k, dtype=torch.bool)
    full, none = condition(None), condition(torch.zeros(k, dtype=torch.bool))
    off = [condition(~identity[i]) for i in range(k)]
    on = [condition(identity[i]) for i in range(k)]
    return {
        name: TaskAblation(
            full[t][0],
            none[t][0],
            np.stack([o[t][0] for o in off]),
            np.stack([o[t][0] for o in on]),
            full[t][1],
            np.stack([o[t][1] for o in off]),
        )
        for t, name in enumerate(tasks)
    }


def _evaluate_all(
    model: nn.Module, inputs: Tensor, targets: Tensor, evaluate: Evaluate, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    scores, correct = [], []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            score, right = evaluate(model, inputs[start : start + batch_size], targets[start : start + batch_size])
            scores.append(score.detach().double().cpu().numpy())
            correct.append(right.detach().cpu().numpy().astype(bool))
    return np.concatenate(scores), np.concatenate(correct)

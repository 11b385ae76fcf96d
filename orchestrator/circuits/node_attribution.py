"""Cluster-level attribution (the node variant of EAP-IG): integrated gradients over a scaling of one hidden
layer's activations, summed per neuron and then per cluster. A neuron's score is the metric's expected change
when it is switched off, so the cluster scores add up to m(layer zeroed) − m(model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from orchestrator.circuits.ablation import HiddenLayer
from orchestrator.circuits.attribution import Metric


def cluster_node_attribution(
    model: nn.Module, layer: HiddenLayer, batches: Sequence, metric: Metric, steps: int = 8
) -> Tensor:
    """`[k]` score per cluster of `layer`: Σ over its neurons of −h·mean_α ∂m/∂(α·h), α = (s − 0.5)/steps."""
    per_neuron = torch.zeros(len(layer.labels), dtype=torch.float64)
    for step in range(1, steps + 1):
        for batch in batches:
            hidden, gradient = _scaled_gradient(model, layer, batch, metric, (step - 0.5) / steps)
            contribution = -(hidden * gradient) / (steps * len(batches))  # [..., d_hidden]
            per_neuron += contribution.reshape(-1, contribution.shape[-1]).sum(dim=0).cpu()
    k = int(layer.labels.max()) + 1
    return torch.zeros(k, dtype=torch.float64).index_add_(0, layer.labels.long(), per_neuron)


def _scaled_gradient(
    model: nn.Module, layer: HiddenLayer, batch, metric: Metric, alpha: float
) -> tuple[Tensor, Tensor]:
    """The layer's activations h and ∂m/∂(α·h) on one batch, in float64, with the layer scaled by α."""
    captured = {}

    def scale(hidden: Tensor) -> Tensor:  # [..., d_hidden]
        captured["hidden"] = hidden.detach()
        captured["scaled"] = (hidden.detach() * alpha).requires_grad_(True)  # a leaf: only its gradient is needed
        return captured["scaled"]

    module = model.get_submodule(layer.module)
    handle = (
        module.register_forward_pre_hook(lambda _m, args: (scale(args[0]), *args[1:]))
        if layer.at == "input"
        else module.register_forward_hook(lambda _m, _args, output: scale(output))
    )
    try:
        with torch.enable_grad():
            gradient = torch.autograd.grad(metric(model, batch), captured["scaled"])[0]
    finally:
        handle.remove()
    return captured["hidden"].double(), gradient.double()

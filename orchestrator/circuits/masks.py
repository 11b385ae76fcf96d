"""Weight masks shared by the circuit finders: which weights are in scope, and a model with a mask applied."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def default_scope(model: nn.Module) -> list[str]:
    """Every nn.Linear weight, by parameter name: the papers' circuit scope (no biases, convolutions,
    embeddings or norms)."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def regularised_scope(model: nn.Module) -> list[str]:
    """The weights the clusterability loss regularises (a transformer's MLP in/out projections, or the groups a
    model declares), by parameter name; every nn.Linear weight for a model with neither."""
    from orchestrator.modularity.weight_graphs import find_matrix_groups

    try:
        groups = find_matrix_groups(model)
    except ValueError:
        return default_scope(model)
    return [f"{matrix.name}.weight" for group in groups for matrix in group.matrices]


def apply_mask(model: nn.Module, mask: Mapping[str, Tensor]) -> nn.Module:
    """A float64 copy of the model in eval mode with every masked-out weight set to zero."""
    pruned = copy.deepcopy(model).double().eval()
    parameters = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, keep in mask.items():
            parameters[name].mul_(keep.to(parameters[name].device, torch.float64))
    return pruned


def classifier_score(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a float64 classifier on (inputs, targets)."""
    with torch.no_grad():
        logits = model(inputs.double() if inputs.is_floating_point() else inputs)
    targets = targets.long()
    loss = torch.nn.functional.cross_entropy(logits, targets)
    return float(loss), float((logits.argmax(dim=1) == targets).double().mean())

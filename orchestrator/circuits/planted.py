"""Networks with a known circuit: class c reads only its own inputs, through its own hidden units.

`planted_classifier` builds a bias-free ReLU MLP `classes·inputs_per_class → classes·hidden_per_class → classes`
where class c's block of inputs feeds only class c's hidden units (`U(0.5, 1)` weights) and those write to
logit c (`U(0.5, 1)·out_scale`) and, as distractors, to every other logit (`distractor`). Its circuit for class c
is exactly its two blocks; the clusters of its hidden layer are the classes. Tests and the circuits benchmark
measure the finders against it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def planted_classifier(
    classes: int = 4,
    inputs_per_class: int = 2,
    hidden_per_class: int = 2,
    distractor: float = 0.1,
    out_scale: float = 1.0,
    seed: int = 0,
) -> nn.Sequential:
    """`nn.Sequential(Linear, ReLU, Linear)` in float64 with the planted blocks (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    n_in, n_hidden = classes * inputs_per_class, classes * hidden_per_class
    hidden_class = torch.arange(n_hidden) // hidden_per_class  # [n_hidden]
    input_class = torch.arange(n_in) // inputs_per_class  # [n_in]
    same = hidden_class[:, None] == input_class[None, :]  # [n_hidden, n_in]
    first = torch.where(same, 0.5 + 0.5 * torch.rand(n_hidden, n_in, generator=generator, dtype=torch.float64), 0.0)
    own = torch.arange(classes)[:, None] == hidden_class[None, :]  # [classes, n_hidden]
    planted = (0.5 + 0.5 * torch.rand(classes, n_hidden, generator=generator, dtype=torch.float64)) * out_scale
    second = torch.where(own, planted, torch.full_like(planted, distractor))
    model = nn.Sequential(
        nn.Linear(n_in, n_hidden, bias=False), nn.ReLU(), nn.Linear(n_hidden, classes, bias=False)
    ).double()
    with torch.no_grad():
        model[0].weight.copy_(first)
        model[2].weight.copy_(second)
    return model


def planted_examples(
    label: int, classes: int = 4, inputs_per_class: int = 2, count: int = 200, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """`count` inputs of class `label` (its block `U(0.5, 1.5)`, zeros elsewhere) `[count, n_in]`, and labels."""
    generator = torch.Generator().manual_seed(seed * 1000 + label)
    inputs = torch.zeros(count, classes * inputs_per_class, dtype=torch.float64)
    block = slice(label * inputs_per_class, (label + 1) * inputs_per_class)
    inputs[:, block] = 0.5 + torch.rand(count, inputs_per_class, generator=generator, dtype=torch.float64)
    return inputs, torch.full((count,), label, dtype=torch.long)


def planted_mask(
    label: int, classes: int = 4, inputs_per_class: int = 2, hidden_per_class: int = 2
) -> dict[str, Tensor]:
    """The true circuit of `label`: its input→hidden block and its hidden units' weights to its logit."""
    hidden_class = torch.arange(classes * hidden_per_class) // hidden_per_class
    input_class = torch.arange(classes * inputs_per_class) // inputs_per_class
    first = (hidden_class[:, None] == label) & (input_class[None, :] == label)
    second = (torch.arange(classes)[:, None] == label) & (hidden_class[None, :] == label)
    return {"0.weight": first, "2.weight": second}

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


ATTENTION_CLASSES = 4


def planted_attention_classifier(seed: int = 0) -> nn.Module:
    """xcm's modular-addition transformer, tiny (d_model 8, 2 heads of 4, d_mlp 4, vocab 4 + "="), answering the
    first token of `[a, b, =]` through one attention path, with random distractors that provably do nothing.

    Residual dims 0-3 are the token (one-hot; "=" is 0), 4-6 the position, 7 is always 0. Head 0 reads position
    0 from the last position (query unit 0 ← dim 6, key unit 0 ← dim 4, score 12), copies the token (value unit
    c ← dim c) and writes it back (output dim c ← unit c); the unembedding reads it (logit c ← 4·dim c). Every
    other weight of head 1, the output projection's head-1 columns and the MLP reads dim 7 or a unit fed only by
    it, so it is random but changes no value. For label c the circuit is exactly `planted_attention_mask(c)`."""
    from orchestrator.models.modular_addition import ModularAdditionTransformer

    generator = torch.Generator().manual_seed(seed)
    model = ModularAdditionTransformer(ATTENTION_CLASSES + 1, d_model=8, n_heads=2, d_mlp=4).double()
    spare = 7

    def distractors(rows: int) -> Tensor:  # [rows, 8]: random weights on the always-zero dim only
        weights = torch.zeros(rows, 8, dtype=torch.float64)
        weights[:, spare] = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.5
        return weights

    attention = model.attention
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:ATTENTION_CLASSES, :ATTENTION_CLASSES] = torch.eye(ATTENTION_CLASSES)
        model.position.weight.zero_()
        model.position.weight[:, 4:7] = torch.eye(3, dtype=torch.float64)
        for projection in (attention.query, attention.key, attention.value):
            projection.weight.copy_(distractors(8))
        attention.query.weight[0] = 0.0
        attention.query.weight[0, 6] = 12.0
        attention.key.weight[0] = 0.0
        attention.key.weight[0, 4] = 1.0
        attention.value.weight[:4] = torch.eye(4, 8, dtype=torch.float64)
        attention.output.weight.zero_()
        attention.output.weight[:, 4:] = torch.rand(8, 4, generator=generator, dtype=torch.float64) + 0.5
        attention.output.weight[:4, :4] = torch.eye(4, dtype=torch.float64)
        model.mlp.w_in.weight.copy_(distractors(4))
        model.mlp.w_out.weight.copy_(torch.rand(8, 4, generator=generator, dtype=torch.float64) + 0.5)
        model.unembed.weight.zero_()
        model.unembed.weight[:ATTENTION_CLASSES, :ATTENTION_CLASSES] = 4 * torch.eye(ATTENTION_CLASSES)
    return model.eval()


def planted_attention_examples(label: int) -> tuple[Tensor, Tensor]:
    """`[label, b, =]` for every b `[4, 3]`, and the label: the first token is the answer."""
    second = torch.arange(ATTENTION_CLASSES)
    inputs = torch.stack([torch.full_like(second, label), second, torch.full_like(second, ATTENTION_CLASSES)], 1)
    return inputs, torch.full((ATTENTION_CLASSES,), label, dtype=torch.long)


def planted_attention_mask(label: int) -> dict[str, Tensor]:
    """The circuit of `label`: head 0's query and key weights that pick position 0, and the value, output and
    unembedding weights that carry token `label` to its logit."""
    shapes = {
        "attention.query.weight": (8, 8),
        "attention.key.weight": (8, 8),
        "attention.value.weight": (8, 8),
        "attention.output.weight": (8, 8),
        "mlp.w_in.weight": (4, 8),
        "mlp.w_out.weight": (8, 4),
        "unembed.weight": (ATTENTION_CLASSES + 1, 8),
    }
    mask = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    mask["attention.query.weight"][0, 6] = mask["attention.key.weight"][0, 4] = True
    for name in ("attention.value.weight", "attention.output.weight", "unembed.weight"):
        mask[name][label, label] = True
    return mask

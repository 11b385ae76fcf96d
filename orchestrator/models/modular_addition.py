"""A one-layer transformer for ``(a + b) mod p`` (the papers' algorithmic model, after Nanda et al.'s grokking setup).

Prompt ``[a, b, =]``; the logits at ``=`` classify the sum. No layer norm, ReLU MLP, causal attention. The MLP
is one clusterability group, and, as in the papers' code, the attention projections another (query, key and
value are in-projections over the same ``n_heads · d_head`` units that the output projection reads).
"""

from __future__ import annotations

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:  # [B, T, d_model]
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, d_model] -> [B, heads, T, d_head]
            return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

        mixed = nn.functional.scaled_dot_product_attention(
            heads(self.query(residual)), heads(self.key(residual)), heads(self.value(residual)), is_causal=True
        )
        return self.output(mixed.transpose(1, 2).flatten(2))  # [B, T, d_model]


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_mlp, bias=False)
        self.w_out = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.w_out(torch.relu(self.w_in(residual)))


class ModularAdditionTransformer(nn.Module):
    """Embed + position, one attention and one MLP block on the residual stream, unembed at the last position."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_heads: int = 4,
        d_mlp: int = 128,
        positions: int = 3,
        regularise_attention: bool = True,
    ):
        super().__init__()
        self.regularise_attention = regularise_attention
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(positions, d_model)
        self.attention = CausalSelfAttention(d_model, n_heads)
        self.mlp = MLP(d_model, d_mlp)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, T] tokens -> [B, vocab] logits
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        residual = self.embed(inputs) + self.position(positions)  # [B, T, d_model]
        residual = residual + self.attention(residual)
        residual = residual + self.mlp(residual)
        return self.unembed(residual[:, -1])

    def modularity_groups(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        groups = [("mlp", ("mlp.w_in",), ("mlp.w_out",))]
        if self.regularise_attention:
            groups.append(("attention", ("attention.query", "attention.key", "attention.value"), ("attention.output",)))
        return groups

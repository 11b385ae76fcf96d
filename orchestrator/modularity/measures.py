"""Clusterability: the share of a matrix's squared weight mass that lies inside its k diagonal blocks.

Block masses are computed with one-hot label matrices (`R.T @ W² @ C`), never with a dense `[n_out, n_in]`
mask, so the cost is one pass over `W` whatever `k` is, and everything stays differentiable in `W`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def onehot(labels: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """`[n, k]` one-hot matrix of `labels` `[n]`, on the labels' device."""
    return torch.nn.functional.one_hot(labels.long(), k).to(dtype)


def block_mass_onehot(weight: Tensor, row_onehot: Tensor, col_onehot: Tensor) -> Tensor:
    """`[k, k]` squared mass between row cluster i and column cluster j, from one-hot labels."""
    squared = weight.to(compute_dtype(weight.dtype)).pow(2)  # [n_out, n_in]
    return row_onehot.to(squared.dtype).T @ squared @ col_onehot.to(squared.dtype)


def block_mass(weight: Tensor, row_labels: Tensor, col_labels: Tensor, k: int) -> Tensor:
    """`[k, k]` squared weight mass between row cluster i and column cluster j of `weight` `[n_out, n_in]`."""
    return block_mass_onehot(weight, onehot(row_labels, k), onehot(col_labels, k))


def clusterability_parts(weight: Tensor, row_onehot: Tensor, col_onehot: Tensor) -> tuple[Tensor, Tensor]:
    """In-block and total squared mass of `weight` `[..., n_out, n_in]` under one-hot labels `[..., n_out, k]`,
    `[..., n_in, k]`: scalars for one matrix, `[G]` for a stack of G. The regulariser stacks same-shape matrices to
    compute C of all of them in a handful of batched operators rather than ~7 per matrix (forward, and backward)."""
    squared = weight.to(compute_dtype(weight.dtype)).square()  # [..., n_out, n_in]
    # trace(R.T W² C) without the off-diagonal blocks: column-wise mass per row cluster, kept where clusters match.
    # R.T @ W² rather than W² @ C: with k, the short side, first, a CPU BLAS runs the product several times faster.
    per_row_cluster = row_onehot.to(squared.dtype).transpose(-2, -1) @ squared  # [..., k, n_in]
    inside = (per_row_cluster * col_onehot.to(squared.dtype).transpose(-2, -1)).sum(dim=(-2, -1))
    # Every row has one cluster, so the [k, n_in] sums add up to the total: one pass over W fewer.
    return inside, per_row_cluster.sum(dim=(-2, -1))


class StackedClusterability(torch.autograd.Function):
    """C and total squared mass of G same-shape matrices, `[G]` each, with a hand-written backward,
    dC/dW = 2W(M - C)/S (M: 1 where the row's and column's clusters match, S: the total mass).

    Why not autograd through ``clusterability_parts``: its graph keeps a float32 copy of every bf16/fp16 matrix
    (the squaring's input) from the forward to the backward, which under ZeRO-3 materialises every regularised
    matrix at once on every rank (222 MiB for GPT-2 124M, ~7 GiB for Gemma-2B's MLPs). Saved here: the weights
    themselves (under ZeRO-3 the parameters, gathered again for their module's backward) and the one-hots. The
    price is a Python backward: ~12 us more per call than autograd's on a CPU (one [64, 256] matrix, forward and
    backward: 71 us against 59).
    ``apply(row_onehots [G, n_out, k], col_onehots [G, n_in, k], *weights)``; the total is not differentiable.
    """

    @staticmethod
    def forward(ctx, row_onehots: Tensor, col_onehots: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
        inside, total = clusterability_parts(_stacked(weights), row_onehots, col_onehots)  # [G], [G]
        value = inside / total
        ctx.save_for_backward(row_onehots, col_onehots, value, total, *weights)
        ctx.mark_non_differentiable(total)
        return value, total

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_total: Tensor) -> tuple[Tensor | None, ...]:
        row_onehots, col_onehots, value, total, *weights = ctx.saved_tensors
        scale = (2 * grad_value / total).view(-1, 1, 1)  # [G, 1, 1]
        # scale (M - C) as one product, M = R Cᵀ, with -scale C as the product's starting value: [G, n_out, n_in]
        coefficient = torch.baddbmm(
            -value.view(-1, 1, 1) * scale,
            row_onehots.to(value.dtype) * scale,
            col_onehots.to(value.dtype).transpose(-2, -1),
        )
        grads = coefficient.mul_(_stacked(weights)).to(weights[0].dtype)
        return None, None, *grads.unbind()


def _stacked(weights: Sequence[Tensor]) -> Tensor:
    """`[G, n_out, n_in]`; a view, not a copy, of a single matrix (the per-module hooks' case)."""
    return weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)


def clusterability_onehot(weight: Tensor, row_onehot: Tensor, col_onehot: Tensor) -> Tensor:
    """C from one-hot labels, for measurement (the training loss uses StackedClusterability, which saves less)."""
    inside, total = clusterability_parts(weight, row_onehot, col_onehot)
    return inside / total


def clusterability(weight: Tensor, row_labels: Tensor, col_labels: Tensor, k: int | None = None) -> Tensor:
    """Scalar C(W) = in-block squared mass / total squared mass; 1 = no interaction between clusters.

    `weight` is `[n_out, n_in]`; `k` defaults to the largest label + 1. Differentiable in `weight`.
    """
    if k is None:
        k = int(max(row_labels.max(), col_labels.max())) + 1
    return clusterability_onehot(weight, onehot(row_labels, k), onehot(col_labels, k))


def baseline(row_labels: Tensor, col_labels: Tensor, k: int) -> Tensor:
    """b = Σ_i |U_i||V_i| / (n_out n_in): the C that a matrix with no structure gets under this partition."""
    rows = torch.bincount(row_labels, minlength=k).double()  # [k]
    cols = torch.bincount(col_labels, minlength=k).double()  # [k]
    return (rows * cols).sum() / (row_labels.numel() * col_labels.numel())


def normalised_clusterability(c: Tensor | float, b: Tensor | float) -> Tensor | float:
    """(C - b) / (1 - b): 0 for no structure beyond the partition's sizes, 1 for perfectly separate clusters."""
    return (c - b) / (1 - b)


class ModelClusterability(NamedTuple):
    mean: Tensor
    mass_weighted: Tensor


def model_clusterability(values: Sequence[Tensor | float], masses: Sequence[Tensor | float]) -> ModelClusterability:
    """A model's C: the plain mean over its matrices (the papers' figure) and the mean weighted by squared mass."""
    c = torch.stack([torch.as_tensor(v) for v in values]).double()  # [n_matrices]
    mass = torch.stack([torch.as_tensor(m) for m in masses]).double()  # [n_matrices]
    return ModelClusterability(mean=c.mean(), mass_weighted=(c * mass).sum() / mass.sum())

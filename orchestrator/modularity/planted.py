"""Matrices with a known answer: k planted blocks in noise, rows and columns shuffled. Tests and the
co-clustering benchmark measure how well a partition is recovered from them."""

from __future__ import annotations

import torch
from torch import Tensor

from orchestrator.modularity.labels import contiguous_labels


def planted_blocks(
    n_out: int, n_in: int, k: int, noise: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """`weight` `[n_out, n_in]` with Gaussian entries of std 1 inside the k diagonal blocks and `noise` outside,
    and its true row labels `[n_out]` and column labels `[n_in]` (near-equal block sizes, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    rows = contiguous_labels(n_out, k)[torch.randperm(n_out, generator=generator)]  # [n_out]
    cols = contiguous_labels(n_in, k)[torch.randperm(n_in, generator=generator)]  # [n_in]
    inside = rows[:, None] == cols[None, :]  # [n_out, n_in]
    scale = torch.where(inside, 1.0, noise).to(dtype)
    weight = torch.randn(n_out, n_in, generator=generator, dtype=dtype) * scale
    return weight, rows, cols

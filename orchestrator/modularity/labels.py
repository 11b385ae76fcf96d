"""Cluster labels that are not computed from weights: the fixed contiguous partition, and identity across
recomputations (a new partition's labels renamed so that cluster i is still, mostly, the old cluster i)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def contiguous_labels(n: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """Unit j of n in cluster floor(j*k/n): the papers' fixed partition, as good as any for a model trained
    from scratch (its units are permutation-symmetric), but not for a pretrained one."""
    if not 1 <= k <= n:
        raise ValueError(f"contiguous_labels: need 1 <= k <= n, got n={n}, k={k}")
    return torch.arange(n, device=device) * k // n


def hungarian_permutation(score: Tensor) -> Tensor:
    """`[k]` permutation p maximising Σ_i score[i, p[i]] for a `[k, k]` score matrix (on score's device)."""
    _, columns = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long, device=score.device)


def align_labels(new_labels: Tensor, old_labels: Tensor, k: int) -> Tensor:
    """Permutation `[k]` renaming new cluster i to `p[i]` so that the most units keep their old cluster."""
    if new_labels.shape != old_labels.shape:
        raise ValueError(
            f"align_labels: labels of different shapes {tuple(new_labels.shape)} and "
            f"{tuple(old_labels.shape)}; both must label the same units"
        )
    pairs = new_labels.long() * k + old_labels.long().to(new_labels.device)
    overlap = torch.bincount(pairs, minlength=k * k).reshape(k, k)  # [k_new, k_old]
    return hungarian_permutation(overlap)


def apply_permutation(labels: Tensor, permutation: Tensor) -> Tensor:
    """Labels renamed by `permutation` (new name of cluster i is `permutation[i]`)."""
    return permutation.to(labels.device)[labels]

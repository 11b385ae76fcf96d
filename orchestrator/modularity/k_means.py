"""k-means in torch: runs where the data lives (CPU or GPU) and is reproducible from a seed.

The spectral embeddings xcm clusters are small (`n_out + n_in` points in `k - 1` dimensions), so plain
Lloyd iterations are cheap; what matters is a good start (k-means++), several restarts, and never losing a
cluster, because every one of the `k` clusters must pair rows with columns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(points: Tensor, k: int, *, n_init: int = 10, max_iter: int = 300, seed: int = 0) -> Tensor:
    """Labels `[n]` in `0..k-1` of the best (lowest inertia) of `n_init` k-means++ / Lloyd runs on `points` `[n, d]`."""
    if points.dim() != 2 or not 1 <= k <= points.shape[0]:
        raise ValueError(f"kmeans: need points [n, d] with 1 <= k <= n, got shape {tuple(points.shape)} and k={k}")
    generator = torch.Generator(device=points.device).manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = _kmeans_plus_plus(points, k, generator)
        labels, inertia = _lloyd(points, centers, max_iter)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _squared_distances(points: Tensor, centers: Tensor) -> Tensor:
    """`[n, k]` squared Euclidean distances, via the expansion |x|² - 2x·c + |c|² (one matmul)."""
    distances = points.pow(2).sum(1, keepdim=True) - 2 * points @ centers.T + centers.pow(2).sum(1)
    return distances.clamp_min_(0)


def _kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """`[k, d]` starting centers, each drawn with probability ∝ its squared distance to those already chosen."""
    n = points.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=points.device)
    centers = [points[first]]  # each [1, d]
    closest = _squared_distances(points, centers[0]).squeeze(1)  # [n]
    for _ in range(1, k):
        # All points already on a center (fewer distinct points than k): any point will do.
        weights = closest if bool(closest.sum() > 0) else torch.ones_like(closest)
        chosen = torch.multinomial(weights, 1, generator=generator)
        centers.append(points[chosen])
        closest = torch.minimum(closest, _squared_distances(points, centers[-1]).squeeze(1))
    return torch.cat(centers)


def _lloyd(points: Tensor, centers: Tensor, max_iter: int) -> tuple[Tensor, float]:
    """Alternate assignment and mean updates until no label changes; returns labels `[n]` and the inertia."""
    previous = None
    for _ in range(max_iter):
        distances = _squared_distances(points, centers)  # [n, k]
        labels = distances.argmin(1)
        if previous is not None and torch.equal(labels, previous):
            break
        centers = _update_centers(points, labels, distances)
        previous = labels
    inertia = distances.gather(1, labels[:, None]).sum()
    return labels, float(inertia)


def _update_centers(points: Tensor, labels: Tensor, distances: Tensor) -> Tensor:
    """Cluster means `[k, d]`; an empty cluster is re-seeded at the points worst served by their own center."""
    k = distances.shape[1]
    counts = torch.bincount(labels, minlength=k)  # [k]
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device).index_add_(0, labels, points)
    centers = sums / counts.clamp_min(1)[:, None].to(points.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        own_distance = distances.gather(1, labels[:, None]).squeeze(1)  # [n]
        centers[empty] = points[own_distance.topk(empty.numel()).indices]
    return centers

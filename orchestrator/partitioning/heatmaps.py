"""Heatmaps of regularised matrices, rows and columns reordered by cluster, the k diagonal blocks outlined.

The picture a user wants in the MLflow UI: a modular matrix shows bright blocks on the diagonal and a dark
rest; an enmeshed one shows no pattern. Drawn with matplotlib's Agg canvas (no pyplot, no display, no global
state), so any thread or Ray actor can draw.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from orchestrator.modularity import clusterability

# Larger matrices are average-pooled to at most this many pixels a side before drawing.
MAX_PIXELS = 512


def block_heatmap(weight: Tensor, row_labels: Tensor, col_labels: Tensor, k: int, title: str) -> bytes:
    """PNG of |W| (`[n_out, n_in]`), rows and columns sorted by cluster, with each cluster's block outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    weight = weight.detach().float().cpu()
    row_labels, col_labels = row_labels.cpu(), col_labels.cpu()
    image = weight.abs()[torch.argsort(row_labels, stable=True)][:, torch.argsort(col_labels, stable=True)]
    height, width = min(image.shape[0], MAX_PIXELS), min(image.shape[1], MAX_PIXELS)
    image = torch.nn.functional.adaptive_avg_pool2d(image[None], (height, width))[0]  # [height, width]
    row_edges, col_edges = _block_edges(row_labels, k), _block_edges(col_labels, k)

    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    n_out, n_in = weight.shape
    shown = axes.imshow(
        image.numpy(),
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        extent=(0, n_in, n_out, 0),
        vmax=float(image.quantile(0.99)) or None,
    )  # axes in units
    figure.colorbar(shown, ax=axes, label="|weight|")
    for i in range(k):
        top, bottom = row_edges[i], row_edges[i + 1]
        left, right = col_edges[i], col_edges[i + 1]
        axes.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="cyan", linewidth=1.2))
    c = float(clusterability(weight, row_labels, col_labels, k))
    axes.set_title(f"{title}\nC = {c:.3f} (k = {k})", fontsize=9)
    axes.set_xlabel("inputs, sorted by cluster")
    axes.set_ylabel("outputs, sorted by cluster")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _block_edges(labels: Tensor, k: int) -> list[int]:
    """Where each cluster starts in the sorted order: `k + 1` unit positions from 0 to the side length."""
    return [0, *torch.cumsum(torch.bincount(labels, minlength=k), 0).tolist()]

"""Heatmaps of a regularised matrix reordered by cluster, as PNG bytes any thread or actor can draw."""

import io

import matplotlib.image

from orchestrator.modularity import planted_blocks
from orchestrator.partitioning.heatmaps import block_heatmap


def test_heatmap_is_a_png_and_bounded_in_size_for_large_matrices():
    """A GPT-2-sized matrix (3072 x 768) is pooled before drawing: a readable PNG of a fixed figure size."""
    weight, rows, cols = planted_blocks(3072, 768, 4, seed=0)
    png = block_heatmap(weight, rows, cols, 4, "transformer.h.0.mlp.c_fc")
    assert png.startswith(b"\x89PNG")
    height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
    assert 200 < height < 1000 and 200 < width < 1000
    assert len(png) < 2_000_000

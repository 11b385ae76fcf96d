"""Spectral co-clustering recovers planted block structure, pairs rows with columns, and is reproducible."""

import pytest
import torch
from sklearn.cluster import SpectralCoclustering
from sklearn.metrics import adjusted_rand_score

from orchestrator.modularity import clusterability, cocluster, cocluster_separate, planted_blocks, spectral_embedding
from orchestrator.modularity.coclustering import FULL_SVD_MAX_SIDE


@pytest.mark.parametrize("shape", [(512, 128), (128, 512), (300, 300)])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_cocluster_recovers_planted_blocks_at_least_as_well_as_sklearn(shape, k):
    """Planted, shuffled blocks come back with ARI >= 0.95 on rows and columns, never below scikit-learn's."""
    weight, rows, cols = planted_blocks(*shape, k, noise=0.3, seed=k)
    row_labels, col_labels = cocluster(weight, k)
    # scikit-learn's co-clustering takes a non-negative matrix: give it |W|, the graph xcm clusters too.
    reference = SpectralCoclustering(n_clusters=k, random_state=0).fit(weight.abs().numpy())
    ours = adjusted_rand_score(rows, row_labels), adjusted_rand_score(cols, col_labels)
    theirs = (adjusted_rand_score(rows, reference.row_labels_), adjusted_rand_score(cols, reference.column_labels_))
    assert min(ours) >= 0.95
    assert ours[0] >= theirs[0] and ours[1] >= theirs[1]


def test_cocluster_pairs_rows_with_their_columns():
    """Row cluster i and column cluster i are the same planted block, so C matches the planted partition's C."""
    weight, rows, cols = planted_blocks(256, 96, 4, seed=5)
    assert clusterability(weight, *cocluster(weight, 4)) == pytest.approx(float(clusterability(weight, rows, cols)))


def test_cocluster_randomized_svd_recovers_large_matrix():
    """Above the full-SVD size the seeded randomized SVD still recovers the planted blocks exactly."""
    weight, rows, cols = planted_blocks(2 * FULL_SVD_MAX_SIDE, FULL_SVD_MAX_SIDE + 64, 4, seed=2)
    row_labels, col_labels = cocluster(weight, 4)
    assert adjusted_rand_score(rows, row_labels) == 1.0 and adjusted_rand_score(cols, col_labels) == 1.0


def test_cocluster_same_seed_same_labels():
    """The same seed gives identical labels, on a matrix without structure where k-means ties are likely."""
    weight = torch.randn(700, 600, generator=torch.Generator().manual_seed(0))
    first = cocluster(weight, 4, seed=7)
    second = cocluster(weight, 4, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cocluster_returns_a_long_label_per_row_and_column():
    """Labels are long tensors with one entry per row and per column."""
    row_labels, col_labels = cocluster(torch.randn(40, 30), 3)
    assert row_labels.dtype == col_labels.dtype == torch.long
    assert row_labels.shape == (40,) and col_labels.shape == (30,)


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_spectral_embedding_computes_in_float32_at_least(dtype, expected):
    """Half-precision weights are embedded in float32; float64 weights stay float64."""
    rows, cols = spectral_embedding(torch.randn(20, 10).to(dtype), 2)
    assert rows.dtype == cols.dtype == expected


@pytest.mark.parametrize(("shape", "k"), [((4, 5, 6), 2), ((10, 3), 4), ((10, 3), 1)])
def test_cocluster_rejects_bad_input(shape, k):
    """A non-matrix, or k outside 2..min(shape), raises a ValueError that names the constraint."""
    with pytest.raises(ValueError, match="cocluster"):
        cocluster(torch.randn(shape), k)


def test_cocluster_separate_mass_pairing_measures_true_clusterability():
    """The papers' separate k-means, re-paired by block mass, measures C close to the planted partition's C."""
    weight, rows, cols = planted_blocks(512, 128, 4, seed=3)
    true_c = float(clusterability(weight, rows, cols))
    measured = float(clusterability(weight, *cocluster_separate(weight, 4, pairing="mass")))
    assert measured == pytest.approx(true_c, abs=0.01)


def test_cocluster_separate_label_pairing_keeps_kmeans_labels():
    """Label pairing finds the same row and column clusters as mass pairing, differing only in column names."""
    weight, _, _ = planted_blocks(256, 64, 4, seed=4)
    by_label = cocluster_separate(weight, 4, pairing="label")
    by_mass = cocluster_separate(weight, 4, pairing="mass")
    assert torch.equal(by_label[0], by_mass[0])
    assert adjusted_rand_score(by_label[1], by_mass[1]) == 1.0


def test_cocluster_separate_rejects_unknown_pairing():
    """Only 'label' and 'mass' pairings exist."""
    with pytest.raises(ValueError, match="pairing"):
        cocluster_separate(torch.randn(10, 10), 2, pairing="overlap")

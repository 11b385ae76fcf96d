"""Group partitions: one hidden partition for all of a group's matrices, aligned and serialised faithfully."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from orchestrator.modularity import GroupPartition, clusterability, partition_group, planted_blocks


def _planted_gated_mlp(k: int = 4):
    """Gate and up [d_ff=192, 64] and down [64, 192] sharing planted hidden clusters."""
    joined, hidden, columns = planted_blocks(192, 3 * 64, k, seed=0)  # [192, 192] = [gate | up | down^T]
    gate, up, down_t = joined.split(64, dim=1)
    return (gate, up), (down_t.T,), hidden, columns.split(64)


def test_spectral_partition_recovers_planted_group():
    """Co-clustering [gate | up | down^T] recovers the planted hidden and per-matrix side clusters."""
    weights_in, weights_out, hidden, sides = _planted_gated_mlp()
    partition = partition_group(weights_in, weights_out, 4)
    assert adjusted_rand_score(hidden, partition.hidden) == 1.0
    for truth, found in zip(sides, partition.inputs + partition.outputs, strict=True):
        assert adjusted_rand_score(truth, found) == 1.0
    # Side cluster i is paired with hidden cluster i of the same block: each matrix measures its planted C.
    truths = [(hidden, sides[0]), (hidden, sides[1]), (sides[2], hidden)]
    for weight, found, truth in zip(weights_in + weights_out, partition.matrix_labels(), truths, strict=True):
        assert float(clusterability(weight, *found)) == pytest.approx(float(clusterability(weight, *truth)))


def test_matrix_labels_are_in_n_out_n_in_orientation():
    """In-projections get (hidden, columns); out-projections get (rows, hidden), matching their weight shapes."""
    weights_in, weights_out, _, _ = _planted_gated_mlp()
    partition = partition_group(weights_in, weights_out, 4, method="contiguous")
    for weight, (rows, cols) in zip(weights_in + weights_out, partition.matrix_labels(), strict=True):
        assert (rows.numel(), cols.numel()) == tuple(weight.shape)


def test_contiguous_partition_uses_floor_formula_per_side():
    """The contiguous method labels hidden neurons and each matrix's residual side by floor(j*k/n)."""
    partition = partition_group([torch.randn(12, 8)], [torch.randn(6, 12)], 3, method="contiguous")
    assert partition.hidden.tolist() == [j * 3 // 12 for j in range(12)]
    assert partition.outputs[0].tolist() == [j * 3 // 6 for j in range(6)]


def test_aligned_to_recovers_a_permuted_partition_exactly():
    """A partition with renamed clusters aligns back to the original, hidden and side labels alike."""
    weights_in, weights_out, _, _ = _planted_gated_mlp()
    original = partition_group(weights_in, weights_out, 4)
    aligned = original.permuted(torch.tensor([2, 3, 1, 0])).aligned_to(original)
    assert torch.equal(aligned.hidden, original.hidden)
    pairs = zip(aligned.inputs + aligned.outputs, original.inputs + original.outputs, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_dict_round_trip_is_exact():
    """to_dict gives plain ints and lists (JSON as it is), and from_dict (also from numpy arrays) restores the
    same partition."""
    partition = partition_group([torch.randn(12, 8)], [torch.randn(6, 12)], 3)
    data = partition.to_dict()
    assert json.loads(json.dumps(data)) == data
    arrays = {**data, "hidden": np.asarray(data["hidden"])}
    for restored in (GroupPartition.from_dict(data), GroupPartition.from_dict(arrays)):
        assert restored.k == 3 and torch.equal(restored.hidden, partition.hidden)
        assert torch.equal(restored.inputs[0], partition.inputs[0]) and torch.equal(
            restored.outputs[0], partition.outputs[0]
        )


def test_unknown_method_is_rejected():
    """Only spectral and contiguous partitions exist."""
    with pytest.raises(ValueError, match="method"):
        partition_group([torch.randn(4, 4)], [], 2, method="random")

"""Contiguous labels and label alignment across recomputed partitions."""

import torch

from orchestrator.modularity import align_labels, apply_permutation, contiguous_labels


def test_contiguous_labels_follow_floor_formula():
    """Unit j of n lands in cluster floor(j*k/n), giving near-equal consecutive blocks."""
    assert contiguous_labels(10, 4).tolist() == [j * 4 // 10 for j in range(10)]


def test_align_labels_recovers_a_permutation_exactly():
    """Renaming the clusters of a partition and aligning back to it restores the original labels."""
    old = torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(0))
    renamed = apply_permutation(old, torch.tensor([3, 5, 0, 1, 4, 2]))
    assert torch.equal(apply_permutation(renamed, align_labels(renamed, old, 6)), old)


def test_align_labels_keeps_majority_identity_under_noise():
    """When a few units change cluster, alignment still maps each new cluster to its old majority."""
    generator = torch.Generator().manual_seed(1)
    old = torch.randint(0, 4, (400,), generator=generator)
    new = apply_permutation(old, torch.tensor([2, 0, 3, 1]))
    new[:40] = torch.randint(0, 4, (40,), generator=generator)  # 10% of units move
    aligned = apply_permutation(new, align_labels(new, old, 4))
    assert (aligned[40:] == old[40:]).all()

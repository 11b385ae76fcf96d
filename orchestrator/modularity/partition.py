"""One partition per matrix group: the hidden neurons, plus the residual-stream side of every matrix.

Co-clustering the in-projections side by side with the transposed out-projections
(`[W_in_1 | W_in_2 | W_out_1^T]`, rows = hidden neurons) gives all of a group's matrices one hidden
partition, so hidden cluster i is the same neurons in each matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from orchestrator.modularity.coclustering import cocluster
from orchestrator.modularity.labels import align_labels, apply_permutation, contiguous_labels
from orchestrator.modularity.loss import ClusterabilityRegulariser
from orchestrator.modularity.weight_graphs import MatrixGroup

PARTITION_METHODS = ("spectral", "contiguous")


@dataclass(frozen=True)
class GroupPartition:
    k: int
    hidden: Tensor  # [d_hidden]: rows of the in-projections, columns of the out-projections
    inputs: tuple[Tensor, ...]  # per in-projection, its column labels [n_in]
    outputs: tuple[Tensor, ...]  # per out-projection, its row labels [n_out]

    def matrix_labels(self) -> list[tuple[Tensor, Tensor]]:
        """`(row_labels, col_labels)` per matrix, `[n_out, n_in]` orientation; in-projections, then out-projections."""
        return [(self.hidden, cols) for cols in self.inputs] + [(rows, self.hidden) for rows in self.outputs]

    def permuted(self, permutation: Tensor) -> GroupPartition:
        """The same partition with cluster i renamed `permutation[i]` everywhere."""
        return GroupPartition(
            self.k,
            apply_permutation(self.hidden, permutation),
            tuple(apply_permutation(labels, permutation) for labels in self.inputs),
            tuple(apply_permutation(labels, permutation) for labels in self.outputs),
        )

    def aligned_to(self, previous: GroupPartition) -> GroupPartition:
        """Renamed so that cluster i keeps, as far as possible, the units of `previous`'s cluster i
        (one permutation over hidden and side units together, since they are paired)."""
        permutation = align_labels(self._all_labels(), previous._all_labels().to(self.hidden.device), self.k)
        return self.permuted(permutation)

    def to_dict(self) -> dict:
        """Plain ints and lists, the one dict form of a partition: what actors return, checkpoints keep as JSON
        and processes send each other."""
        return {
            "k": self.k,
            "hidden": self.hidden.tolist(),
            "inputs": [labels.tolist() for labels in self.inputs],
            "outputs": [labels.tolist() for labels in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> GroupPartition:
        """Inverse of `to_dict`; the labels may also be numpy arrays."""

        def labels(values) -> Tensor:
            return torch.as_tensor(np.asarray(values), dtype=torch.long)

        return cls(
            int(data["k"]),
            labels(data["hidden"]),
            tuple(labels(v) for v in data["inputs"]),
            tuple(labels(v) for v in data["outputs"]),
        )

    def _all_labels(self) -> Tensor:
        return torch.cat([self.hidden, *self.inputs, *self.outputs])


def partition_group(
    weights_in: Sequence[Tensor], weights_out: Sequence[Tensor], k: int, method: str = "spectral", seed: int = 0
) -> GroupPartition:
    """Partition a group from its in-projections (`[d_hidden, n_in]` each) and out-projections
    (`[n_out, d_hidden]` each): spectrally, on the side-by-side matrix, or contiguously."""
    if method not in PARTITION_METHODS:
        raise ValueError(f"partition_group: method must be one of {PARTITION_METHODS}, got {method!r}")
    if not weights_in and not weights_out:
        raise ValueError("partition_group: the group has no matrices; pass at least one in- or out-projection")
    sides = [w.detach() for w in weights_in] + [w.detach().T for w in weights_out]  # each [d_hidden, n_j]
    widths = [side.shape[1] for side in sides]
    if method == "contiguous":
        hidden = contiguous_labels(sides[0].shape[0], k, sides[0].device)
        columns = [contiguous_labels(width, k, sides[0].device) for width in widths]
    else:
        hidden, joined = cocluster(torch.cat(sides, dim=1), k, seed)  # [d_hidden], [Σ n_j]
        columns = list(joined.split(widths))
    n_inputs = len(weights_in)
    return GroupPartition(k, hidden, tuple(columns[:n_inputs]), tuple(columns[n_inputs:]))


def regularise_groups(
    regulariser: ClusterabilityRegulariser, groups: Sequence[MatrixGroup], partitions: Mapping[str, GroupPartition]
) -> None:
    """Register every matrix of `groups` with the regulariser under its group's partition (by group name),
    or swap in the new partition where the matrix is already registered."""
    for group in groups:
        partition = partitions[group.name]
        for matrix, (rows, cols) in zip(group.matrices, partition.matrix_labels(), strict=True):
            if matrix.name in regulariser:
                regulariser.set_partition(matrix.name, rows, cols, partition.k)
            else:
                regulariser.add(matrix.name, matrix.module, rows, cols, partition.k, matrix.transposed)

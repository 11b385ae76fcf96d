"""Where a circuit's kept weights lie relative to a partition: inside the diagonal blocks (cluster i's units
talking to cluster i's) or between clusters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from orchestrator.modularity.partition import GroupPartition
from orchestrator.modularity.weight_graphs import find_matrix_groups


class MatrixLabels(NamedTuple):
    """Cluster labels of one weight matrix in `[n_out, n_in]` orientation; `transposed` when the parameter is
    stored `[n_in, n_out]` (transformers' Conv1D)."""

    rows: Tensor  # [n_out]
    cols: Tensor  # [n_in]
    k: int
    transposed: bool = False


class Locality(NamedTuple):
    share: float  # kept weights inside the diagonal blocks / kept weights, over the labelled matrices
    blocks: dict[str, Tensor]  # per parameter, [k, k] count of kept weights from column cluster j to row cluster i


def matrix_labels(model: nn.Module, partitions: Mapping[str, GroupPartition]) -> dict[str, MatrixLabels]:
    """Per weight parameter name, its labels from the group partitions (keyed by group name, as training keeps
    them), found through the model's matrix groups."""
    groups = {group.name: group for group in find_matrix_groups(model)}
    unknown = sorted(set(partitions) - set(groups))
    if unknown:
        raise ValueError(
            f"partition names groups {unknown} that {type(model).__name__} does not have (its groups: {sorted(groups)})"
        )
    labels = {}
    for name, partition in partitions.items():
        group = groups[name]
        matrices = group.inputs[: len(partition.inputs)] + group.outputs[: len(partition.outputs)]
        for matrix, (rows, cols) in zip(matrices, partition.matrix_labels(), strict=True):
            labels[f"{matrix.name}.weight"] = MatrixLabels(rows.cpu(), cols.cpu(), partition.k, matrix.transposed)
    return labels


def resolve_partition(model: nn.Module, partition: Mapping | None) -> dict[str, MatrixLabels] | None:
    """Per-matrix labels from either form a caller holds: group partitions by group name, or labels by
    parameter name."""
    if partition is None:
        return None
    if all(isinstance(value, GroupPartition) for value in partition.values()):
        return matrix_labels(model, partition)
    if all(isinstance(value, MatrixLabels) for value in partition.values()):
        return dict(partition)
    raise ValueError("partition must map group names to GroupPartition or parameter names to MatrixLabels")


def circuit_locality(mask: Mapping[str, Tensor], labels: Mapping[str, MatrixLabels]) -> Locality:
    """The share of kept weights that lie inside the partition's diagonal blocks, over the masked matrices that
    have labels, and per matrix the kept-weight count of every block."""
    blocks, inside, kept = {}, 0.0, 0.0
    for name, matrix_mask in mask.items():
        if name not in labels:
            continue
        rows, cols, k, transposed = labels[name]
        oriented = (matrix_mask.T if transposed else matrix_mask).double().cpu()  # [n_out, n_in]
        row_onehot = nn.functional.one_hot(rows.long(), k).double()  # [n_out, k]
        col_onehot = nn.functional.one_hot(cols.long(), k).double()  # [n_in, k]
        blocks[name] = row_onehot.T @ oriented @ col_onehot  # [k, k]
        inside += float(torch.diagonal(blocks[name]).sum())
        kept += float(blocks[name].sum())
    if not blocks:
        raise ValueError(f"the partition labels none of the circuit's matrices {sorted(mask)}")
    return Locality(inside / kept if kept else float("nan"), blocks)

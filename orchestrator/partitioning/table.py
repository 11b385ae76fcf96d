"""A partition as a flat table: what the MLflow report and ``xcm export`` write as Parquet."""

from __future__ import annotations

import torch

from orchestrator.modularity import GroupPartition, MatrixGroup


def partition_table(groups: list[MatrixGroup], partitions: dict[str, GroupPartition]):
    """Every unit's cluster as a flat Arrow table (group, matrix, side, unit, cluster): readable by any tool."""
    import pyarrow as pa

    columns: dict[str, list] = {"group": [], "matrix": [], "side": [], "unit": [], "cluster": []}

    def add(group: str, matrix: str, side: str, labels: torch.Tensor) -> None:
        values = labels.tolist()
        columns["group"] += [group] * len(values)
        columns["matrix"] += [matrix] * len(values)
        columns["side"] += [side] * len(values)
        columns["unit"] += list(range(len(values)))
        columns["cluster"] += values

    for group in groups:
        partition = partitions[group.name]
        add(group.name, "", "hidden", partition.hidden)
        for matrix, labels in zip(group.inputs, partition.inputs, strict=True):
            add(group.name, matrix.name, "input", labels)
        for matrix, labels in zip(group.outputs, partition.outputs, strict=True):
            add(group.name, matrix.name, "output", labels)
    return pa.table(columns)

"""The trainers' side of partitioning: gather each group's matrices onto rank 0, and the partition as a table.

Under ZeRO-3 each rank holds a shard of every matrix, so the gather is a collective every rank enters, one
group at a time (never the whole model at once); under ZeRO 0-2 it is a no-op. Rank 0 keeps a float32 CPU
copy as numpy arrays, which Ray's object store shares without copying with the partitioner actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.modularity import GroupPartition, MatrixGroup


@dataclass(frozen=True)
class GroupSnapshot:
    """One group's matrices at one step, as the partitioner receives them."""

    weights_in: tuple[np.ndarray, ...]  # [d_hidden, n_in] each
    weights_out: tuple[np.ndarray, ...]  # [n_out, d_hidden] each
    names: tuple[str, ...]  # matrix names: in-projections, then out-projections

    def tensors(self, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """In- and out-projections as tensors on `device`."""
        def load(arrays):  # copied: arrays from the object store are read-only
            return [torch.tensor(array, device=device) for array in arrays]
        return load(self.weights_in), load(self.weights_out)


def gather_snapshot(groups: list[MatrixGroup], rank: int) -> dict[str, GroupSnapshot] | None:
    """Every rank must call this at the same step; rank 0 gets ``{group name: GroupSnapshot}``, the others None."""
    import deepspeed

    snapshot: dict[str, GroupSnapshot] = {}
    for group in groups:
        with deepspeed.zero.GatheredParameters([m.module.weight for m in group.matrices], modifier_rank=None):
            if rank == 0:
                snapshot[group.name] = GroupSnapshot(
                    weights_in=tuple(_copy(m.weight()) for m in group.inputs),
                    weights_out=tuple(_copy(m.weight()) for m in group.outputs),
                    names=tuple(m.name for m in group.matrices))
    return snapshot if rank == 0 else None


def _copy(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().float().cpu().numpy().copy()


def plain_partition(partition: GroupPartition) -> dict:
    """``GroupPartition.to_dict`` with plain lists: what actors return and checkpoints keep (any format holds it)."""
    return {"k": partition.k, "hidden": partition.hidden.tolist(),
            "inputs": [labels.tolist() for labels in partition.inputs],
            "outputs": [labels.tolist() for labels in partition.outputs]}


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
        for matrix, labels in zip(group.inputs, partition.inputs):
            add(group.name, matrix.name, "input", labels)
        for matrix, labels in zip(group.outputs, partition.outputs):
            add(group.name, matrix.name, "output", labels)
    return pa.table(columns)

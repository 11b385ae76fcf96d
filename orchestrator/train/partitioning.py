"""The start-of-training partition: gather each group's matrices, co-cluster on rank 0, broadcast the labels.

Under ZeRO-3 each rank holds a shard of every matrix, so the gather is a collective every rank enters, one
group at a time (never the whole model at once); under ZeRO 0-2 it is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.modularity import GroupPartition, MatrixGroup, partition_group
from orchestrator.spec import ModularitySpec


def compute_partitions(groups: list[MatrixGroup], modularity: ModularitySpec,
                       rank: int) -> dict[str, GroupPartition]:
    """Every rank gets the same ``{group name: GroupPartition}``, computed once on rank 0."""
    import deepspeed

    partitions: dict[str, dict] = {}
    for group in groups:
        with deepspeed.zero.GatheredParameters([m.module.weight for m in group.matrices], modifier_rank=None):
            if rank == 0:
                weights_in = [_copy(m.weight()) for m in group.inputs]  # [d_ff, d_model] each
                weights_out = [_copy(m.weight()) for m in group.outputs]  # [d_model, d_ff] each
        if rank == 0:
            partition = partition_group(weights_in, weights_out, modularity.k,
                                        method=modularity.partition, seed=modularity.seed)
            partitions[group.name] = partition.to_dict()
    payload = [partitions]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return {name: GroupPartition.from_dict(data) for name, data in payload[0].items()}


def _copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().clone()


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

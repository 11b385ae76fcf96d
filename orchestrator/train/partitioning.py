"""The start-of-training partition: gather each group's matrices, co-cluster on rank 0, broadcast the labels.

Under ZeRO-3 each rank holds a shard of every matrix, so the gather is a collective every rank enters, one
group at a time (never the whole model at once); under ZeRO 0-2 it is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.modularity import GroupPartition, MatrixGroup, partition_group
from orchestrator.spec import ModularitySpec


def compute_partitions(engine, groups: list[MatrixGroup], modularity: ModularitySpec,
                       rank: int) -> dict[str, GroupPartition]:
    """Every rank gets the same ``{group name: GroupPartition}``, computed once on rank 0."""
    import deepspeed

    partitions: dict[str, dict] = {}
    for group in groups:
        matrices = group.in_matrices + group.out_matrices
        with deepspeed.zero.GatheredParameters([m.module.weight for m in matrices], modifier_rank=None):
            if rank == 0:
                weights_in = [_copy(m.weight()) for m in group.in_matrices]  # [d_ff, d_model] each
                weights_out = [_copy(m.weight()) for m in group.out_matrices]  # [d_model, d_ff] each
        if rank == 0:
            partition = partition_group(weights_in, weights_out, modularity.k,
                                        method=modularity.partition, seed=modularity.seed)
            partitions[group.name] = partition.to_dict()
    payload = [partitions]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    device = engine.device
    return {name: GroupPartition.from_dict(data).to(device) for name, data in payload[0].items()}


def _copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().clone()

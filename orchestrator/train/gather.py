"""Gather named matrices from every rank's ZeRO shards onto rank 0, for any side job that reads the weights.

Under ZeRO-3 each rank holds a shard of every matrix, so the gather is a collective every rank enters, one
group at a time (never the whole model at once); under ZeRO 0-2 it is a no-op. Rank 0 keeps a float32 CPU
copy as numpy arrays, which Ray's object store shares without copying with the partitioner actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.modularity import MatrixGroup


@dataclass(frozen=True)
class GroupSnapshot:
    """One group's matrices at one step, as a side job (the partitioner) receives them."""

    weights_in: tuple[np.ndarray, ...]  # [d_hidden, n_in] each
    weights_out: tuple[np.ndarray, ...]  # [n_out, d_hidden] each
    names: tuple[str, ...]  # matrix names: in-projections, then out-projections

    def tensors(self, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """In- and out-projections as tensors on `device`."""
        def load(arrays):  # copied: arrays from the object store are read-only
            return [torch.tensor(array, device=device) for array in arrays]
        return load(self.weights_in), load(self.weights_out)


def gather_groups(groups: list[MatrixGroup], rank: int) -> dict[str, GroupSnapshot] | None:
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

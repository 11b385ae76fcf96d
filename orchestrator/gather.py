"""Gather named matrices from every rank's ZeRO shards onto rank 0, for any side job that reads the weights.

Under ZeRO-3 each rank holds a shard of every matrix, so a gather is a collective every rank enters, one group
(or one parameter) at a time, never the whole model at once; under ZeRO 0-2 it is a no-op. Rank 0 keeps a
float32 CPU copy as numpy arrays, which Ray's object store shares without copying with a side job's actors; a side
job that needs every parameter can have each put into the object store as it is gathered (`stream_model`), so
that rank 0 never holds more than one parameter's copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.modularity import MatrixGroup
from orchestrator.ranks import Rank


@dataclass(frozen=True)
class Needs:
    """What a side job reads of the model when it is due: its regularised matrix groups, every parameter, or both."""

    groups: bool = False
    model: bool = False
    stream_model: bool = False  # rank 0 puts each parameter into Ray's object store as it comes: `model` holds refs


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


@dataclass(frozen=True)
class Gathered:
    """Rank 0's copy of what a side job `Needs`, at one step; a part not needed is None."""

    groups: dict[str, GroupSnapshot] | None = None  # group name -> its matrices
    model: dict[str, Any] | None = None  # parameter name -> float32 copy (its ObjectRef when streamed)


def gather(needs: Needs, module: torch.nn.Module, groups: Sequence[MatrixGroup], rank: Rank) -> Gathered | None:
    """Every rank must call this at the same step with the same `needs`; rank 0 gets the copy, the others None."""
    gathered = Gathered(
        groups=gather_groups(groups, rank) if needs.groups else None,
        model=gather_parameters(module, rank, _object_store() if needs.stream_model else None) if needs.model else None,
    )
    return gathered if rank.leads else None


def gather_groups(groups: Sequence[MatrixGroup], rank: Rank) -> dict[str, GroupSnapshot] | None:
    """Every rank must call this at the same step; rank 0 gets ``{group name: GroupSnapshot}``, the others None."""
    import deepspeed

    snapshot: dict[str, GroupSnapshot] = {}
    for group in groups:
        with deepspeed.zero.GatheredParameters([m.module.weight for m in group.matrices], modifier_rank=None):
            if rank.leads:
                snapshot[group.name] = GroupSnapshot(
                    weights_in=tuple(_copy(m.weight()) for m in group.inputs),
                    weights_out=tuple(_copy(m.weight()) for m in group.outputs),
                    names=tuple(m.name for m in group.matrices),
                )
    return snapshot if rank.leads else None


def gather_parameters(
    module: torch.nn.Module, rank: Rank, store: Callable[[np.ndarray], Any] | None = None
) -> dict[str, Any] | None:
    """Every parameter of `module`, one at a time (a collective under ZeRO-3); rank 0 gets them by name: the
    copies, or what `store` returns for each, so that rank 0 holds one copy at a time rather than the model."""
    import deepspeed

    state: dict[str, Any] = {}
    for name, parameter in module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if rank.leads:
                # the store copies the gathered buffer before it is freed, so rank 0 makes no copy of its own
                state[name] = _copy(parameter) if store is None else store(parameter.detach().float().cpu().numpy())
    return state if rank.leads else None


def _object_store() -> Callable[[np.ndarray], Any]:
    import ray

    return ray.put


def _copy(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().float().cpu().numpy().copy()

"""Attribution-ranked circuits of a model that DeepSpeed ZeRO-3 shards, computed on the training ranks themselves:
no rank ever holds a whole scoped matrix beyond what ZeRO-3's own layer-by-layer gather holds in a forward or
backward.

The same quantities as ``attribution_weight_circuit`` (the scores, the faithfulness grid, ``size_at`` by bisection,
CPR/CMD, per-matrix sizes and locality), from each rank's partition of every scoped matrix (``param.ds_tensor``):
the integrated-gradient scaling multiplies the partitions, the engine's own forward and backward compute the
gradient (ZeRO-3 reduce-scatters it, so each rank reads the gradient of its own partition), and a circuit's
masking zeroes partition elements. The global top-`count` cut is the exact `count`-th largest score over all
ranks, found by bisection on the scores' bit patterns with one all-reduce of counts per step, never by gathering
the scores. The task batches are dealt round-robin to the ranks; every rank runs the same number of passes
(a rank without a batch left repeats one with weight zero) because each pass is a collective. A bf16 engine
scores in its own precision (its passes and gradient partitions are bf16, summed in float32), which agrees with
the whole-model scores of its bf16 weights to bf16 rounding; an fp16 engine is refused, its gradient partitions
carrying the dynamic loss scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.attribution import (
    AttributionCircuit,
    Faithfulness,
    Metric,
    check_taus,
    judged_circuit,
    method_line,
    scoped_parameters,
)
from orchestrator.circuits.locality import Locality, MatrixLabels, resolve_partition


@dataclass(frozen=True)
class Shard:
    """This rank's partition of one scoped matrix: elements `start .. start + size` of the flattened matrix."""

    parameter: nn.Parameter
    start: int
    size: int  # the real elements; the last rank's partition is padded past them (with non-zero values)

    def local(self) -> Tensor:
        """The partition's real elements, a view of the parameter's ZeRO-3 storage: [size]."""
        return self.parameter.ds_tensor.narrow(0, 0, self.size)


def sharded_attribution_circuit(
    engine,
    batches: Sequence,
    metric: Metric,
    params: Sequence[str] | None = None,
    ig_steps: int = 8,
    taus: Iterable[float] = (0.8, 0.9, 0.95, 1.0),
    signed: bool = True,
    eval_batches: Sequence | None = None,
    partition: Mapping | None = None,
) -> AttributionCircuit:
    """``attribution_weight_circuit`` of a ZeRO-3 engine's module; every rank calls it with the same arguments,
    between optimizer steps. `scores` and `masks` hold this rank's partitions (flat, real elements only); every
    other field is global and the same on every rank. The weights are restored bit for bit, the optimizer is
    never stepped and the engine's gradients are left zeroed."""
    taus = check_taus(ig_steps, taus)
    if not batches or (eval_batches is not None and not eval_batches):
        raise ValueError("sharded attribution: no task batches to score or judge the circuit on")
    shards = local_shards(engine, params)
    labels = resolve_partition(engine.module, partition)  # refused before any pass, not after them all
    judged = eval_batches if eval_batches is not None else batches
    with _scoring(engine):
        scores = sharded_gradient_scores(engine, shards, batches, metric, ig_steps, signed)
        masking = ShardedMasking(engine, shards, scores, judged, metric)
        judge = Faithfulness(masking, masking.size)
        faithfulness, counts = judge.grid_and_counts(taus)
        masks = {tau: masking.mask(count) for tau, count in counts.items()}
    world = torch.distributed.get_world_size(masking.group)
    return judged_circuit(
        f"{method_line(ig_steps, signed, taus, len(shards), len(batches), eval_batches)}, on {world} ZeRO-3 ranks",
        scores,
        judge,
        faithfulness,
        counts,
        masks,
        sizes_at={tau: _kept_shares(shards, mask, masking.group) for tau, mask in masks.items()},
        locality=None
        if labels is None
        else {tau: _locality(shards, mask, labels, masking.group) for tau, mask in masks.items()},
    )


def local_shards(engine, params: Sequence[str] | None) -> dict[str, Shard]:
    """This rank's partition of each scoped matrix; refuses an engine that is not ZeRO-3, computes in fp16 or does
    not keep its gradient partitions where ``safe_get_local_grad`` reads them every pass."""
    if engine.zero_optimization_stage() != 3:
        raise ValueError(
            f"sharded attribution needs DeepSpeed ZeRO-3 (the engine runs stage {engine.zero_optimization_stage()}); "
            "under ZeRO 0-2 every rank holds the whole model: use attribution_weight_circuit on engine.module"
        )
    if engine.fp16_enabled():
        raise ValueError(
            "sharded attribution is proven in fp32 and bf16 only: an fp16 engine's gradient partitions carry its "
            "dynamic loss scale, at which they overflow or underflow; train in bf16 or fp32, or score a float32 "
            "copy with attribution_weight_circuit"
        )
    if engine.optimizer.offload_optimizer:
        raise ValueError(
            "sharded attribution reads each pass's gradient partitions, which deepspeed.offload_optimizer moves to "
            "the CPU only at a step's end: set deepspeed.offload_optimizer: false"
        )
    shards = {}
    for name, parameter in scoped_parameters(engine.module, params).items():
        if not parameter.requires_grad:
            raise ValueError(f"sharded attribution: {name} is frozen, so the engine computes no gradient for it")
        if getattr(parameter, "ds_secondary_tensor", None) is not None:
            raise ValueError(f"sharded attribution: {name} has ZeRO++ secondary partitions, which it does not support")
        group = parameter.ds_process_group
        partition = parameter.ds_tensor.ds_numel  # padded: every rank's partition has this many elements
        start = torch.distributed.get_rank(group) * partition
        shards[name] = Shard(parameter, start, max(0, min(partition, parameter.ds_numel - start)))
    return shards


@contextmanager
def _scoring(engine):
    """The module in eval mode (no dropout), as the whole-model path scores it, for the duration; the optimizer's
    gradient partitions zeroed after, so the next training step starts from nothing of ours."""
    from deepspeed.utils import safe_set_local_grad

    optimizer = engine.optimizer
    if optimizer.micro_step_id != 0 or getattr(optimizer, "_epilogue_ran_this_backward", False):
        raise ValueError("sharded attribution must run between optimizer steps, not inside a gradient accumulation")
    training = engine.module.training
    engine.module.eval()
    try:
        yield
    finally:
        optimizer.zero_grad()
        for parameter in engine.module.parameters():
            if parameter.requires_grad:
                safe_set_local_grad(parameter, torch.zeros(parameter.ds_tensor.ds_numel))
        engine.module.train(training)


def sharded_gradient_scores(
    engine, shards: Mapping[str, Shard], batches: Sequence, metric: Metric, steps: int, signed: bool = True
) -> dict[str, Tensor]:
    """`I_w = −w · ḡ_w` for this rank's partition of each scoped matrix, ḡ averaged over `steps` scalings of the
    scope and over all `batches` (the ranks share them out); `|I_w|` when not `signed`. A bf16 engine's passes
    and gradient partitions are bf16 (no loss scale); they are summed, and the scores computed, in float32."""
    from deepspeed.utils import safe_get_local_grad

    originals = {name: shard.parameter.ds_tensor.clone() for name, shard in shards.items()}  # padding included
    dtype = torch.promote_types(next(iter(originals.values())).dtype, torch.float32)
    grads = {name: originals[name].new_zeros(shard.size, dtype=dtype) for name, shard in shards.items()}
    group = _group(shards)
    try:
        for step in range(1, steps + 1):
            _set_partitions(engine, shards, originals, (step - 0.5) / steps)
            for batch, weight in _my_passes(batches, group):
                engine.backward(metric(engine, _on(batch, engine.device)) * weight, scale_wrt_gas=False)
                for name, shard in shards.items():
                    grads[name] += safe_get_local_grad(shard.parameter)[: shard.size].to(dtype) / steps
                engine.optimizer.zero_grad()  # the next pass's backward overwrites the partitions, not adds to them
    finally:
        _set_partitions(engine, shards, originals, 1.0)
    scores = {name: -originals[name][: shard.size].to(dtype) * grads[name] for name, shard in shards.items()}
    overflowed = torch.tensor(int(not all(bool(torch.isfinite(score).all()) for score in scores.values())))
    if int(_all_max(overflowed, group)):  # on every rank alike: a rank that raised alone would leave the rest waiting
        raise ValueError("sharded attribution: a gradient overflowed (non-finite scores); check the task's metric")
    return scores if signed else {name: score.abs() for name, score in scores.items()}


class ShardedMasking:
    """Mean metric over the ranks of the top-`count` circuit, each rank zeroing its own partitions' unkept
    elements; the cut is found from the ranks' sorted local scores without gathering them."""

    def __init__(self, engine, shards: Mapping[str, Shard], scores: Mapping[str, Tensor], batches, metric):
        self.engine, self.shards, self.scores, self.batches, self.metric = engine, shards, scores, batches, metric
        self.group = _group(shards)
        self.originals = {name: shard.parameter.ds_tensor.clone() for name, shard in shards.items()}
        local = np.concatenate([score.detach().cpu().numpy().reshape(-1) for score in scores.values()])
        self.dtype = local.dtype
        self.keys = np.sort(order_keys(local))  # [local elements], ascending
        self.size = int(all_sum(torch.tensor(len(self.keys)), self.group))

    def __call__(self, count: int) -> float:
        mask = self.mask(count)
        try:
            with torch.no_grad():
                for name, shard in self.shards.items():
                    shard.local().mul_(mask[name].to(shard.local().dtype))
                _drop_gathered(self.engine)
                total = 0.0
                for batch, weight in _my_passes(self.batches, self.group):
                    value = float(self.metric(self.engine, _on(batch, self.engine.device)))  # a collective: always run
                    total += value if weight else 0.0
        finally:
            _set_partitions(self.engine, self.shards, self.originals, 1.0)
        return float(all_sum(torch.tensor(total, dtype=torch.float64), self.group)) / len(self.batches)

    def mask(self, count: int) -> dict[str, Tensor]:
        """Exactly `count` kept weights over all ranks: every score above the global `count`-th largest, then the
        ties at it in parameter order and, within a matrix, in flat order (rank by rank), as ``top_mask`` keeps
        them on a whole model."""
        threshold = self.threshold(count)
        masks = {name: score > threshold for name, score in self.scores.items()}
        ties = {name: score == threshold for name, score in self.scores.items()}
        counts = torch.tensor([int(m.sum()) for m in masks.values()] + [int(t.sum()) for t in ties.values()])
        counts = _on_backend_device(counts, self.group)
        every_rank = [torch.zeros_like(counts) for _ in range(torch.distributed.get_world_size(self.group))]
        torch.distributed.all_gather(every_rank, counts, group=self.group)
        table = torch.stack(every_rank).cpu()  # [ranks, 2 × matrices]: kept above the cut, then tied at it
        ties_left = count - int(table[:, : len(masks)].sum())
        me = torch.distributed.get_rank(self.group)
        for index, name in enumerate(masks):
            for rank in range(len(every_rank)):
                taken = max(0, min(int(table[rank, len(masks) + index]), ties_left))
                if rank == me:
                    masks[name] |= ties[name] & (ties[name].cumsum(0) <= taken)
                ties_left -= taken
        return masks

    def threshold(self, count: int) -> float:
        """The `count`-th largest score over all ranks (inf for none): the largest key with at least `count`
        scores at or above it, bisected over the key range, one all-reduce of a count per halving."""
        if count == 0:
            return math.inf
        big = np.iinfo(np.int64).max
        low = -int(_all_max(torch.tensor(-int(self.keys[0]) if len(self.keys) else -big), self.group))
        high = int(_all_max(torch.tensor(int(self.keys[-1]) if len(self.keys) else -big), self.group)) + 1
        while high - low > 1:  # at least `count` scores at or above `low`, fewer than `count` at or above `high`
            middle = (low + high) // 2
            local = len(self.keys) - int(np.searchsorted(self.keys, middle, side="left"))
            if int(all_sum(torch.tensor(local), self.group)) >= count:
                low = middle
            else:
                high = middle
        return float(key_value(low, self.dtype))


def order_keys(values: np.ndarray) -> np.ndarray:
    """int64 keys in the order of the float32/float64 `values` (−0.0 counted as 0.0): the sign-magnitude bit
    pattern with the magnitude bits of negatives flipped."""
    bits = (values + 0.0).view(np.int32 if values.itemsize == 4 else np.int64).astype(np.int64)
    return np.where(bits < 0, bits ^ _magnitude_bits(values.dtype), bits)


def key_value(key: int, dtype: np.dtype) -> float:
    """The float of `dtype` whose `order_keys` key is `key`."""
    bits = np.array([key], dtype=np.int64)
    bits = np.where(bits < 0, bits ^ _magnitude_bits(dtype), bits)
    return float(bits.astype(np.int32 if np.dtype(dtype).itemsize == 4 else np.int64).view(dtype)[0])


def _magnitude_bits(dtype) -> np.int64:
    return np.int64(0x7FFFFFFF if np.dtype(dtype).itemsize == 4 else 0x7FFFFFFFFFFFFFFF)


def _set_partitions(engine, shards: Mapping[str, Shard], originals: Mapping[str, Tensor], alpha: float) -> None:
    """Every partition set to `alpha` × its original (the original itself, bit for bit, at 1)."""
    with torch.no_grad():
        for name, shard in shards.items():
            shard.parameter.ds_tensor.copy_(originals[name] * alpha if alpha != 1.0 else originals[name])
    _drop_gathered(engine)


def _drop_gathered(engine) -> None:
    """Release every gathered copy of the weights, so that the next pass gathers the changed partitions: ZeRO-3
    keeps small matrices whole on every rank and may keep others gathered for reuse between passes."""
    engine.optimizer.empty_partition_cache()


def _my_passes(batches: Sequence, group) -> list[tuple[object, float]]:
    """This rank's (batch, weight) passes: batches rank, rank + world, ...; weighted world/len(batches), so that
    DeepSpeed's average over the ranks' gradients is the mean over all batches. Every rank gets the same number of
    passes; a rank past the last batch repeats the first with weight 0."""
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    rounds = math.ceil(len(batches) / world)
    indices = [round_ * world + rank for round_ in range(rounds)]
    return [(batches[i], world / len(batches)) if i < len(batches) else (batches[0], 0.0) for i in indices]


def _kept_shares(shards: Mapping[str, Shard], mask: Mapping[str, Tensor], group) -> dict[str, float]:
    """Per matrix, its kept share over all ranks."""
    kept = all_sum(torch.tensor([float(mask[name].sum()) for name in shards], dtype=torch.float64), group)
    return {name: float(k) / shard.parameter.ds_numel for (name, shard), k in zip(shards.items(), kept, strict=True)}


def _locality(
    shards: Mapping[str, Shard], mask: Mapping[str, Tensor], labels: Mapping[str, MatrixLabels], group
) -> Locality:
    """``circuit_locality`` from the partitions: each rank counts its kept elements per (row cluster, column
    cluster) block from their flat indices, and the [k, k] counts are summed over the ranks."""
    blocks, inside, kept = {}, 0.0, 0.0
    for name, shard in shards.items():
        if name not in labels:
            continue
        rows, cols, k, transposed = labels[name]
        flat = shard.start + torch.nonzero(mask[name].cpu()).reshape(-1)  # kept elements' flat indices
        first, second = flat // shard.parameter.ds_shape[1], flat % shard.parameter.ds_shape[1]
        out_index, in_index = (second, first) if transposed else (first, second)
        cells = rows.long()[out_index] * k + cols.long()[in_index]
        blocks[name] = all_sum(torch.bincount(cells, minlength=k * k).double(), group).reshape(k, k)
        inside += float(torch.diagonal(blocks[name]).sum())
        kept += float(blocks[name].sum())
    if not blocks:
        raise ValueError(f"the partition labels none of the circuit's matrices {sorted(mask)}")
    return Locality(inside / kept if kept else float("nan"), blocks)


def _group(shards: Mapping[str, Shard]):
    groups = {id(shard.parameter.ds_process_group): shard.parameter.ds_process_group for shard in shards.values()}
    if len(groups) != 1:
        raise ValueError("sharded attribution needs every scoped matrix partitioned over the same ranks")
    return next(iter(groups.values()))


def all_sum(tensor: Tensor, group=None) -> Tensor:
    """`tensor` summed over the ranks of `group` (the default group for None), on the CPU."""
    reduced = _on_backend_device(tensor, group)
    torch.distributed.all_reduce(reduced, group=group)
    return reduced.cpu()


def _all_max(tensor: Tensor, group) -> Tensor:
    reduced = _on_backend_device(tensor, group)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=group)
    return reduced.cpu()


def _on_backend_device(tensor: Tensor, group) -> Tensor:
    """`tensor` where the group's backend communicates: NCCL (a GPU job's) takes CUDA tensors only, gloo the CPU's."""
    if torch.distributed.get_backend(group) == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _on(batch, device):
    """The batch with its tensors on the engine's device (the task batches are built on the CPU)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_on(item, device) for item in batch)
    return batch

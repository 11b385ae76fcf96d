"""Per-rank, resumable micro-batch streams over packed blocks.

A rank's position is one integer, the number of micro-batches it has consumed. Every batch is a pure
function of (seed, rank, world_size, step), so a resumed run that starts at the saved step sees
exactly the batches it would have seen without the interruption.
"""

import itertools
from collections.abc import Iterator

import torch

from orchestrator.data.packing import split_inputs_and_labels


class ShardedBatches:
    """One rank's disjoint shard of the blocks, reshuffled every epoch, addressed by step."""

    def __init__(self, blocks: torch.Tensor, micro_batch_size: int, rank: int, world_size: int, seed: int):
        _check_arguments(blocks, micro_batch_size, rank, world_size)
        self.blocks = blocks  # [n_blocks, block_size + 1]
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        # Every rank takes the same number of blocks, so all ranks run the same number of steps.
        self.blocks_per_rank = len(blocks) // world_size
        self.batches_per_epoch = self.blocks_per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"rank {rank}'s shard holds {self.blocks_per_rank} blocks ({len(blocks)} blocks over "
                f"world_size={world_size} ranks), fewer than micro_batch_size={micro_batch_size}; "
                "generate more examples or lower micro_batch_size or block_size"
            )
        self._cached_epoch: int | None = None
        self._cached_shard = torch.empty(0, dtype=torch.long)

    def shard(self, epoch: int) -> torch.Tensor:
        """Return the block indices this rank reads in `epoch`, in reading order. [blocks_per_rank]"""
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.blocks), generator=generator)
            # Strided over the same permutation, the ranks' shards are disjoint; the remainder of
            # len(blocks) % world_size blocks sits out this epoch (a different few each epoch).
            self._cached_shard = order[: self.blocks_per_rank * self.world_size][self.rank :: self.world_size]
            self._cached_epoch = epoch
        return self._cached_shard

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Return micro-batch number `step`: {"input_ids": [B, T], "labels": [B, T]}."""
        epoch, index = divmod(step, self.batches_per_epoch)
        rows = self.shard(epoch)[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        # Indexing copies the rows out of a (possibly memory-mapped, int32) block tensor; losses need int64.
        inputs, labels = split_inputs_and_labels(self.blocks[rows].long())  # [B, T] each
        return {"input_ids": inputs.contiguous(), "labels": labels.contiguous()}


def _check_arguments(blocks: torch.Tensor, micro_batch_size: int, rank: int, world_size: int) -> None:
    problems = []
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        problems.append(f"blocks must be [n_blocks, block_size + 1] with block_size >= 1, got {list(blocks.shape)}")
    if micro_batch_size < 1:
        problems.append(f"micro_batch_size={micro_batch_size} must be >= 1")
    if world_size < 1:
        problems.append(f"world_size={world_size} must be >= 1")
    elif not 0 <= rank < world_size:
        problems.append(f"rank={rank} must be in [0, world_size={world_size})")
    if problems:
        raise ValueError("; ".join(problems))


def batch_stream(
    blocks: torch.Tensor, micro_batch_size: int, rank: int, world_size: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches forever, starting at micro-batch `start_step`.

    Arguments are checked now, not at the first `next()`, so a bad configuration fails at setup.
    """
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    batches = ShardedBatches(blocks, micro_batch_size, rank, world_size, seed)
    return map(batches.batch, itertools.count(start_step))

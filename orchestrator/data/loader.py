"""Per-rank, resumable micro-batch streams over packed blocks.

A rank's position is one integer, the number of micro-batches it has consumed. Every batch is a pure
function of (seed, rank, world_size, global batch, step), so a resumed run that starts at the saved step sees
exactly the batches it would have seen without the interruption.

An epoch is a whole number of global batches, whatever the worker count: its order is dealt to the ranks in
turn, micro-batch by micro-batch, so ``p`` micro-batches of each of ``W`` ranks are the order's first
``p x W x micro_batch_size`` blocks, epoch after epoch. A group resized with the same global batch (its gradient
accumulation makes up for the worker count) continues at ``p x W / W'`` with the next unseen block, also past
the first epoch.
"""

import itertools
from collections.abc import Iterator

import torch

from orchestrator.data.packing import split_inputs_and_labels


def epoch_length(
    items: int, micro_batch_size: int, rank: int, world_size: int, global_batch: int | None, what: str, fix: str
) -> int:
    """The items an epoch reads: the most whole global batches that ``items`` hold (``global_batch`` defaults to
    one micro-batch of every rank), the same for every worker count that keeps the global batch. The rest sit
    out the epoch, a different few each epoch. ValueError, naming the fix, when not one global batch fits."""
    global_batch = global_batch or micro_batch_size * world_size
    _check_arguments(micro_batch_size, rank, world_size, global_batch)
    length = items // global_batch * global_batch
    if length == 0:
        raise ValueError(
            f"{items} {what} hold no global batch of {global_batch} (micro_batch_size={micro_batch_size} x "
            f"{global_batch // (micro_batch_size * world_size)} accumulated x world_size={world_size}; rank "
            f"{rank}'s shard would hold {items // world_size} {what}); {fix}"
        )
    return length


class ShardedBatches:
    """One rank's disjoint shard of the blocks, reshuffled every epoch, addressed by step."""

    def __init__(
        self,
        blocks: torch.Tensor,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        global_batch: int | None = None,
    ):
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(
                f"blocks must be [n_blocks, block_size + 1] with block_size >= 1, got {list(blocks.shape)}"
            )
        self.blocks = blocks  # [n_blocks, block_size + 1]
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch_blocks = epoch_length(
            len(blocks),
            micro_batch_size,
            rank,
            world_size,
            global_batch,
            "blocks",
            "generate more examples or lower micro_batch_size or block_size",
        )
        # Every rank takes the same number of blocks, so all ranks run the same number of steps.
        self.blocks_per_rank = self.epoch_blocks // world_size
        self.batches_per_epoch = self.blocks_per_rank // micro_batch_size
        self._cached_epoch: int | None = None
        self._cached_shard = torch.empty(0, dtype=torch.long)

    def shard(self, epoch: int) -> torch.Tensor:
        """Return the block indices this rank reads in `epoch`, in reading order. [blocks_per_rank]"""
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.blocks), generator=generator)
            # Strided over the same permutation, the ranks' shards are disjoint.
            self._cached_shard = order[: self.epoch_blocks][self.rank :: self.world_size]
            self._cached_epoch = epoch
        return self._cached_shard

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Return micro-batch number `step`: {"input_ids": [B, T], "labels": [B, T]}."""
        epoch, index = divmod(step, self.batches_per_epoch)
        rows = self.shard(epoch)[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        # Indexing copies the rows out of a (possibly memory-mapped, int32) block tensor; losses need int64.
        inputs, labels = split_inputs_and_labels(self.blocks[rows].long())  # [B, T] each
        return {"input_ids": inputs.contiguous(), "labels": labels.contiguous()}


def _check_arguments(micro_batch_size: int, rank: int, world_size: int, global_batch: int) -> None:
    problems = []
    if micro_batch_size < 1:
        problems.append(f"micro_batch_size={micro_batch_size} must be >= 1")
    if world_size < 1:
        problems.append(f"world_size={world_size} must be >= 1")
    elif not 0 <= rank < world_size:
        problems.append(f"rank={rank} must be in [0, world_size={world_size})")
    if micro_batch_size >= 1 and world_size >= 1 and global_batch % (micro_batch_size * world_size):
        problems.append(
            f"global_batch={global_batch} must be whole micro-batches of every rank "
            f"(micro_batch_size={micro_batch_size} x world_size={world_size})"
        )
    if problems:
        raise ValueError("; ".join(problems))


def batch_stream(
    blocks: torch.Tensor,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    global_batch: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches forever, starting at micro-batch `start_step`; epochs are whole
    `global_batch`es (micro_batch_size x accumulation x world_size; one micro-batch of every rank if omitted).

    Arguments are checked now, not at the first `next()`, so a bad configuration fails at setup.
    """
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    batches = ShardedBatches(blocks, micro_batch_size, rank, world_size, seed, global_batch)
    return map(batches.batch, itertools.count(start_step))

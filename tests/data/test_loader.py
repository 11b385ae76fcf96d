import itertools

import pytest
import torch

from orchestrator.data import ShardedBatches, batch_stream


def _blocks(n_blocks, block_size=4):
    # Row i holds the values i*10 .. so a batch's rows identify the blocks it came from.
    return torch.arange(n_blocks).unsqueeze(1) * 10 + torch.arange(block_size + 1)  # [n, block_size + 1]


def _rows(batch):
    return [int(row) // 10 for row in batch["input_ids"][:, 0]]


def _take(stream, n):
    return list(itertools.islice(stream, n))


def test_batches_have_shifted_labels_and_fixed_shape():
    """Each batch is {input_ids, labels} of shape [B, block_size], labels shifted by one token."""
    batch = next(batch_stream(_blocks(12), micro_batch_size=3, rank=0, world_size=1, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 4)
    assert torch.equal(batch["labels"], batch["input_ids"] + 1)


def test_ranks_read_disjoint_shards_that_cover_the_data():
    """Over one epoch, the ranks' blocks are disjoint and together are every block."""
    world_size, micro_batch_size, n_blocks = 4, 2, 24
    seen = []
    for rank in range(world_size):
        stream = batch_stream(_blocks(n_blocks), micro_batch_size, rank, world_size, seed=7)
        seen.append([row for batch in _take(stream, 3) for row in _rows(batch)])
    all_rows = [row for rows in seen for row in rows]
    assert sorted(all_rows) == list(range(n_blocks))


def test_every_rank_gets_the_same_number_of_batches_per_epoch():
    """Uneven block counts still give each rank equal steps, so ranks stay in lockstep."""
    lengths = {ShardedBatches(_blocks(23), 2, rank, 4, seed=0).batches_per_epoch for rank in range(4)}
    assert lengths == {2}


def test_resuming_at_step_k_equals_skipping_k_batches():
    """A stream started at start_step=k yields what a fresh stream yields after k batches."""
    args = {"micro_batch_size": 2, "rank": 1, "world_size": 2, "seed": 5}
    fresh = _take(batch_stream(_blocks(20), **args), 17)
    resumed = _take(batch_stream(_blocks(20), start_step=7, **args), 10)
    for expected, actual in zip(fresh[7:], resumed, strict=True):
        assert torch.equal(expected["input_ids"], actual["input_ids"])
        assert torch.equal(expected["labels"], actual["labels"])


def test_epochs_wrap_with_a_new_order_over_the_same_shard_size():
    """After one epoch the stream continues with a reshuffled order of all blocks."""
    stream = batch_stream(_blocks(16), micro_batch_size=4, rank=0, world_size=1, seed=0)
    epochs = [[row for batch in _take(stream, 4) for row in _rows(batch)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(16))
    assert epochs[0] != epochs[1]


def test_too_few_blocks_for_one_micro_batch_names_the_fix():
    """A shard smaller than one micro-batch raises with the counts and the settings to change."""
    with pytest.raises(ValueError, match="micro_batch_size=2") as error:
        batch_stream(_blocks(5), micro_batch_size=2, rank=0, world_size=4, seed=0)
    message = str(error.value)
    assert "1 blocks" in message and "5 blocks" in message and "micro_batch_size=2" in message
    assert "more examples" in message


def test_bad_rank_fails_at_setup():
    """An out-of-range rank raises when the stream is built, not at the first batch."""
    with pytest.raises(ValueError, match="rank=2"):
        batch_stream(_blocks(8), micro_batch_size=1, rank=2, world_size=2, seed=0)


def _global_steps(n_blocks, world_size, accumulation, steps, start_step=0):
    """The blocks each optimizer step of a `world_size` group reads (all ranks together), global batch 8."""
    streams = [
        batch_stream(_blocks(n_blocks), 2, rank, world_size, 3, start_step * accumulation, global_batch=8)
        for rank in range(world_size)
    ]
    return [
        sorted(row for stream in streams for batch in _take(stream, accumulation) for row in _rows(batch))
        for _ in range(steps)
    ]


def test_a_resize_mid_epoch_two_continues_at_the_next_unseen_block():
    """2 workers to 1 at step 8 of 50 blocks (epochs of 6 global batches of 8, 2 blocks sitting out): each step
    after the resize reads the blocks the undisturbed run reads, so no block is read twice or skipped."""
    from orchestrator.train.checkpoint_store import CheckpointState
    from orchestrator.train.checkpointing import data_position

    undisturbed = _global_steps(50, world_size=2, accumulation=2, steps=14)
    state = CheckpointState(8, 8 * 2, world_size=2, zero_stage=2, run_id="r", deepspeed_tag="t", session="s")
    resumed_at = data_position(state, 1)
    assert resumed_at == 8 * 4
    resized = _global_steps(50, world_size=2, accumulation=2, steps=8) + _global_steps(
        50, world_size=1, accumulation=4, steps=6, start_step=8
    )
    assert resized == undisturbed
    second_epoch = [row for step in resized[6:12] for row in step]
    assert len(second_epoch) == len(set(second_epoch)) == 48

"""Labelled examples: seeded hold-outs and per-rank, resumable micro-batch streams."""

import pytest
import torch

from orchestrator.data.examples import LabelledExamples, example_stream, split_examples


def numbered(n: int) -> LabelledExamples:
    """n examples whose input is their own index, so a batch shows which examples it holds."""
    return LabelledExamples(torch.arange(n).unsqueeze(1), torch.arange(n) % 10)


def test_hold_out_is_disjoint_seeded_and_sized():
    """The hold-out takes round(n × fraction) examples, disjoint from training, the same ones for the same seed."""
    train, validation = split_examples(numbered(100), 0.2, seed=3)
    assert (len(train), len(validation)) == (80, 20)
    assert not set(train.inputs.flatten().tolist()) & set(validation.inputs.flatten().tolist())
    again, _ = split_examples(numbered(100), 0.2, seed=3)
    assert torch.equal(train.inputs, again.inputs)
    assert split_examples(numbered(100), 0.0, seed=3)[1] is None


def test_ranks_read_disjoint_shards_covering_the_epoch():
    """In one epoch two ranks read disjoint examples, together all of them (none left over here)."""
    examples = numbered(48)
    seen = []
    for rank in range(2):
        stream = example_stream(examples, micro_batch_size=8, rank=rank, world_size=2, seed=0)
        seen.append({int(i) for _ in range(3) for i in next(stream)["inputs"].flatten()})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))


def test_stream_resumes_at_a_step():
    """A stream started at step s yields what an uninterrupted stream yields at step s, across epochs too."""
    examples = numbered(40)
    full = example_stream(examples, micro_batch_size=4, rank=1, world_size=2, seed=5)
    batches = [next(full) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    resumed = example_stream(examples, micro_batch_size=4, rank=1, world_size=2, seed=5, start_step=7)
    for expected in batches[7:]:
        batch = next(resumed)
        assert torch.equal(batch["inputs"], expected["inputs"]) and torch.equal(batch["labels"], expected["labels"])


def test_too_few_examples_per_rank_fail_at_once():
    """A shard smaller than one micro-batch is an error when the stream is made, naming the fix."""
    with pytest.raises(ValueError, match="micro_batch_size"):
        example_stream(numbered(10), micro_batch_size=8, rank=0, world_size=2, seed=0)

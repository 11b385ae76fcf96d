"""Resuming onto another worker count keeps the global batch, or says which worker counts can."""

import pyarrow.fs as pafs
import pytest

from orchestrator.train import checkpoint_store as store
from orchestrator.train.checkpointing import data_position
from orchestrator.train.resume import ResumeError, keep_global_batch
from tests.helpers import tiny_spec


def written_by(world_size: int, zero_stage: int = 2) -> store.Located:
    state = store.CheckpointState(
        step=10,
        data_position=10 * 2,
        world_size=world_size,
        zero_stage=zero_stage,
        run_id="r",
        deepspeed_tag="step-10",
        session="s",
    )
    return store.Located(pafs.LocalFileSystem(), "/runs/tiny-r/step-00000010", state)


@pytest.mark.parametrize(("before", "after", "accumulation"), [(2, 1, 4), (2, 4, 1), (4, 2, 4)])
def test_gradient_accumulation_keeps_the_global_batch(before, after, accumulation):
    """A run of 8 sequences x 2 accumulated per worker resumed on another worker count accumulates as many
    micro-batches as keep its global batch, and each rank continues after what all ranks have read."""
    old = tiny_spec("training.gradient_accumulation_steps=2", f"resources.num_workers={before}")
    new = keep_global_batch(tiny_spec(f"resources.num_workers={after}"), old, written_by(before))
    assert new.training.gradient_accumulation_steps == accumulation
    assert accumulation * after == 2 * before
    assert data_position(written_by(before).state, after) * after == 10 * 2 * before


def test_a_worker_count_that_cannot_keep_the_global_batch_is_refused_naming_those_that_can():
    """16 sequences (8 x 1 x 2 workers) do not split over 3 workers of 8: refused, naming 1 and 2."""
    with pytest.raises(ResumeError, match=r"global batch of 16 .* N in \[1, 2\]"):
        keep_global_batch(tiny_spec("resources.num_workers=3"), tiny_spec(), written_by(2))


def test_a_checkpoint_without_zero_is_not_resized():
    """ZeRO-0 has no universal conversion here: the resume on another worker count is refused with the way out."""
    with pytest.raises(ResumeError, match=r"ZeRO 1-3.*num_workers=2"):
        keep_global_batch(tiny_spec("resources.num_workers=1"), tiny_spec(), written_by(2, zero_stage=0))

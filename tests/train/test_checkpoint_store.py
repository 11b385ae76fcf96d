"""Checkpoint completeness: the manifest, what counts as intact, and the fallback to the previous checkpoint."""

import logging
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from orchestrator.train import checkpoint_store as store

LOCAL = pafs.LocalFileSystem()


def write_checkpoint(run: Path, step: int, manifest: bool = True) -> Path:
    """A checkpoint as the ranks leave it: DeepSpeed-like shards, the state file, then the manifest."""
    directory = run / store.checkpoint_name(step)
    (directory / "deepspeed" / f"step-{step}").mkdir(parents=True)
    for rank in range(2):
        (directory / "deepspeed" / f"step-{step}" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(
            bytes([rank, step]) * 1000)
    (directory / "xcm").mkdir()
    state = store.CheckpointState(step=step, data_position=step, world_size=2, zero_stage=2, run_id="abc",
                                  deepspeed_tag=f"step-{step}")
    (directory / store.STATE).write_text(state.to_json())
    if manifest:
        store.write_manifest(directory, store.file_records(directory))
    return directory


def test_complete_checkpoint_is_intact_and_newest(tmp_path):
    """A run directory resolves to its newest checkpoint whose manifest matches every file."""
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    located = store.newest_intact(LOCAL, str(tmp_path))
    assert located.path == str(tmp_path / "step-00000020")
    assert located.state.step == 20 and located.state.run_id == "abc"


@pytest.mark.parametrize("damage, reason", [
    (lambda shard: shard.write_bytes(shard.read_bytes()[:-10]), "bytes"),  # truncated upload
    (lambda shard: shard.write_bytes(b"\xff" + shard.read_bytes()[1:]), "sha256"),  # same size, corrupted
    (lambda shard: shard.unlink(), "missing"),  # a rank's file never arrived
])
def test_damaged_checkpoint_is_skipped_for_the_previous(tmp_path, caplog, damage, reason):
    """A truncated, corrupted or incomplete newest checkpoint is skipped, with a warning, for the one before."""
    write_checkpoint(tmp_path, 10)
    newest = write_checkpoint(tmp_path, 20)
    damage(newest / "deepspeed" / "step-20" / "zero_pp_rank_1_optim_states.pt")
    assert reason in store.problem(LOCAL, str(newest))
    with caplog.at_level(logging.WARNING):
        located = store.newest_intact(LOCAL, str(newest))
    assert located.state.step == 10
    assert "skipping checkpoint" in caplog.text and "step-00000020" in caplog.text


def test_checkpoint_without_manifest_does_not_count(tmp_path):
    """A checkpoint whose manifest was never written (a crash while saving) is not used."""
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20, manifest=False)
    assert "no manifest" in store.problem(LOCAL, str(tmp_path / "step-00000020"))
    assert store.newest_intact(LOCAL, str(tmp_path)).state.step == 10


def test_fallback_never_goes_to_a_newer_checkpoint(tmp_path):
    """Given a checkpoint, only it and older ones are candidates; with none intact there is nothing to resume."""
    write_checkpoint(tmp_path, 10, manifest=False)
    write_checkpoint(tmp_path, 20)
    assert store.newest_intact(LOCAL, str(tmp_path / "step-00000010")) is None


def test_relative_paths_resolve_to_the_local_filesystem(tmp_path, monkeypatch):
    """A relative run directory, as a user types it, is found on the local filesystem."""
    write_checkpoint(tmp_path / "run", 5)
    monkeypatch.chdir(tmp_path)
    filesystem, path = store.resolve("run")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert store.newest_intact(filesystem, path).uri == str(tmp_path / "run" / "step-00000005")

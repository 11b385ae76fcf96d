"""Checkpoint completeness: the manifest, what counts as intact, the fallback to the previous checkpoint, which
checkpoint a target names, and the checkpoints a rollback sets aside."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from orchestrator.spec import JobSpec
from orchestrator.train import checkpoint_store as store
from orchestrator.train.checkpointing import capture_rng_state, restore_rng_state
from orchestrator.train.resume import ResumeError, locate

LOCAL = pafs.LocalFileSystem()


def test_complete_checkpoint_is_intact_and_newest(tmp_path, checkpoint_files):
    """A run directory resolves to its newest checkpoint whose manifest matches every file."""
    checkpoint_files.write(tmp_path, 10)
    checkpoint_files.write(tmp_path, 20)
    located = store.newest_intact(LOCAL, str(tmp_path))
    assert located.path == str(tmp_path / "step-00000020")
    assert located.state.step == 20 and located.state.run_id == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda shard: shard.write_bytes(shard.read_bytes()[:-10]), "bytes"),  # truncated upload
        (lambda shard: shard.write_bytes(b"\xff" + shard.read_bytes()[1:]), "sha256"),  # same size, corrupted
        (lambda shard: shard.unlink(), "missing"),  # a rank's file never arrived
    ],
)
def test_damaged_checkpoint_is_skipped_for_the_previous(tmp_path, caplog, checkpoint_files, damage, reason):
    """A truncated, corrupted or incomplete newest checkpoint is skipped, with a warning, for the one before."""
    checkpoint_files.write(tmp_path, 10)
    newest = checkpoint_files.write(tmp_path, 20)
    damage(newest / "deepspeed" / "step-20" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert reason in store.problem(LOCAL, str(newest))
    with caplog.at_level(logging.WARNING):
        located = store.newest_intact(LOCAL, str(newest))
    assert located.state.step == 10
    assert "skipping checkpoint" in caplog.text and "step-00000020" in caplog.text


def test_checkpoint_without_manifest_does_not_count(tmp_path, checkpoint_files):
    """A checkpoint whose manifest was never written (a crash while saving) is not used."""
    checkpoint_files.write(tmp_path, 10)
    checkpoint_files.write(tmp_path, 20, manifest=False)
    assert "no manifest" in store.problem(LOCAL, str(tmp_path / "step-00000020"))
    assert store.newest_intact(LOCAL, str(tmp_path)).state.step == 10


def test_fallback_never_goes_to_a_newer_checkpoint(tmp_path, checkpoint_files):
    """Given a checkpoint, only it and older ones are candidates; with none intact there is nothing to resume."""
    checkpoint_files.write(tmp_path, 10, manifest=False)
    checkpoint_files.write(tmp_path, 20)
    assert store.newest_intact(LOCAL, str(tmp_path / "step-00000010")) is None


def test_relative_paths_resolve_to_the_local_filesystem(tmp_path, monkeypatch, checkpoint_files):
    """A relative run directory, as a user types it, is found on the local filesystem."""
    checkpoint_files.write(tmp_path / "run", 5)
    monkeypatch.chdir(tmp_path)
    filesystem, path, _ = store.resolve("run")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert store.newest_intact(filesystem, path).uri == str(tmp_path / "run" / "step-00000005")


def test_a_named_checkpoint_is_located_exactly(tmp_path, checkpoint_files):
    """`RUN/step-N` names step N even when newer ones exist, and a damaged step N is refused, not replaced by
    another; the run directory names its newest intact checkpoint."""
    for step in (10, 20, 30):
        checkpoint_files.write(tmp_path, step)
    assert locate(str(tmp_path / "step-00000010"), "unused").state.step == 10
    damaged = tmp_path / "step-00000020" / "deepspeed" / "step-20" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(ResumeError, match=r"step-00000020 cannot be used: .*sha256"):
        locate(str(tmp_path / "step-00000020"), "unused")
    assert locate(str(tmp_path), "unused").state.step == 30


def test_a_run_without_any_intact_checkpoint_is_refused_with_each_reason(tmp_path, checkpoint_files):
    """Nothing intact in a run directory: one message naming every checkpoint's problem and the key variable."""
    checkpoint_files.write(tmp_path, 10, manifest=False)
    with pytest.raises(ResumeError, match=r"step-00000010: no manifest.*XCM_CHECKPOINT_KEY"):
        locate(str(tmp_path), "unused")


def test_rollback_sets_the_later_checkpoints_aside_whole(tmp_path, checkpoint_files):
    """Resuming from step 10 of a run that reached 30 moves steps 20 and 30 into superseded-*, where they still
    verify, with Ray's checkpoint list when its shape is unknown (Ray then starts a new one); step 10 and older
    stay."""
    for step in (5, 10, 20, 30):
        checkpoint_files.write(tmp_path, step)
    (tmp_path / store.RAY_SNAPSHOT).write_text("{}")
    moved, refused = store.set_aside_newer(store.verified(LOCAL, str(tmp_path / "step-00000010")))
    assert refused is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step-00000005", "step-00000010", moved.rsplit("/", 1)[1]]
    )
    assert sorted(p.name for p in (tmp_path / moved).iterdir()) == [
        store.RAY_SNAPSHOT,
        "step-00000020",
        "step-00000030",
    ]
    assert store.problem(LOCAL, f"{moved}/step-00000030") is None
    assert store.set_aside_newer(store.verified(LOCAL, str(tmp_path / "step-00000010"))) == (None, None)


def ray_list(*names: str) -> str:
    """Ray Train's list of a run's checkpoints as its checkpoint manager writes it (its own model), the last named
    the latest."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={"step": i}) for i, name in enumerate(names)]
    return _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1],
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(names),
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    ).json()


def listed(run: Path) -> tuple[list[str], str | None]:
    """The checkpoints Ray's list names and its latest, read back with Ray's own model (as Ray restores it)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    state = _CheckpointManagerState.parse_raw((run / store.RAY_SNAPSHOT).read_text())
    latest = state.latest_checkpoint_result
    return [r.checkpoint_dir_name for r in state.checkpoint_results], latest and latest.checkpoint_dir_name


def test_a_resume_past_refused_checkpoints_quarantines_them_until_an_intact_one_is_as_new(tmp_path, checkpoint_files):
    """Resuming at step 20 past a truncated step 30 and a step 40 without manifest: both move into refused-*, Ray's
    list keeps steps 10 and 20 (keep_last goes on deleting them) with step 20 its latest; the quarantine is deleted
    only once the run has an intact checkpoint as new as step 40, and no intact checkpoint is ever deleted."""
    for step in (10, 20, 30):
        checkpoint_files.write(tmp_path, step)
    checkpoint_files.write(tmp_path, 40, manifest=False)
    shard = tmp_path / "step-00000030" / "deepspeed" / "step-30" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / store.RAY_SNAPSHOT).write_text(ray_list("step-00000010", "step-00000020", "step-00000030"))
    located = store.newest_intact(LOCAL, str(tmp_path))
    superseded, refused = store.set_aside_newer(located)
    assert superseded is None and Path(refused).parent == tmp_path
    assert sorted(p.name for p in Path(refused).iterdir()) == ["step-00000030", "step-00000040"]
    assert listed(tmp_path) == (["step-00000010", "step-00000020"], "step-00000020")
    assert store.discard_refused(LOCAL, str(tmp_path)) == []  # the run's newest intact checkpoint is step 20
    checkpoint_files.write(tmp_path, 30)  # the resumed run saves step 30 again
    assert store.discard_refused(LOCAL, str(tmp_path)) == [] and Path(refused).is_dir()
    checkpoint_files.write(tmp_path, 40)
    assert store.discard_refused(LOCAL, str(tmp_path)) == [refused] and not Path(refused).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        store.checkpoint_name(s) for s in (10, 20, 30, 40)
    ]


def test_a_rollback_past_intact_and_refused_checkpoints_keeps_the_intact_ones(tmp_path, checkpoint_files):
    """Rolling back to step 10 past an intact step 20 and a corrupted step 30: step 20 goes to superseded-* (the
    abandoned branch, kept), step 30 to refused-*; discarding the quarantine never touches the branch."""
    for step in (10, 20, 30):
        checkpoint_files.write(tmp_path, step)
    damaged = tmp_path / "step-00000030" / "deepspeed" / "step-30" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    (tmp_path / store.RAY_SNAPSHOT).write_text(ray_list("step-00000020", "step-00000030"))
    superseded, refused = store.set_aside_newer(store.verified(LOCAL, str(tmp_path / "step-00000010")))
    assert [p.name for p in Path(superseded).iterdir()] == ["step-00000020"]
    assert [p.name for p in Path(refused).iterdir()] == ["step-00000030"]
    assert store.problem(LOCAL, f"{superseded}/step-00000020") is None
    assert listed(tmp_path) == ([], None)  # Ray starts from the checkpoint xcm resume names
    for step in (20, 30):
        checkpoint_files.write(tmp_path, step)
    assert store.discard_refused(LOCAL, str(tmp_path)) == [refused]
    assert store.problem(LOCAL, f"{superseded}/step-00000020") is None


def test_storage_query_stays_after_the_run_directory():
    """A storage path with a query (MinIO's endpoint) gets the run directory before the query, not inside it."""
    spec = JobSpec.model_validate(
        {
            "name": "job",
            "checkpointing": {"storage_path": "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"},
        }
    )
    assert (
        store.run_directory(spec, "0123456789abcdef")
        == "s3://bucket/runs/job-01234567?endpoint_override=127.0.0.1:9000&scheme=http"
    )


def test_rng_states_round_trip_through_json():
    """Python, numpy and torch RNG states saved as JSON text restore the exact same draws."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    saved = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(saved)
    assert (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_the_local_copy_must_be_the_checkpoint_chosen(tmp_path, checkpoint_files):
    """What a rank is about to read must hold the state rank 0 chose (the same checkpoint, not one swapped in
    since), besides verifying on its own."""
    chosen = store.verified(LOCAL, str(checkpoint_files.write(tmp_path / "a", 10)))
    store.verify_local(Path(chosen.path), chosen.state)
    other = checkpoint_files.write(tmp_path / "b", 10, session="another-launch")
    with pytest.raises(store.NotIntact, match="not the checkpoint that was verified"):
        store.verify_local(other, chosen.state)


def test_a_state_written_before_universal_checkpoints_still_loads():
    """state.json without the ``universal`` field (every checkpoint before it) loads as not universal; a field of
    another type is refused."""
    fields = {
        "step": 10,
        "data_position": 10,
        "world_size": 2,
        "zero_stage": 2,
        "run_id": "r",
        "deepspeed_tag": "step-10",
        "session": "s",
    }
    assert store.CheckpointState.from_json(json.dumps(fields)).universal is False
    with pytest.raises(ValueError, match="universal"):
        store.CheckpointState.from_json(json.dumps({**fields, "universal": "yes"}))


def _standin_conversion(source: Path, destination: Path, state) -> None:
    """What ``universal.convert`` writes, with a file standing in for DeepSpeed's conversion (these checkpoints'
    shards are not torch files)."""
    import shutil

    from orchestrator.train.universal import universal_state

    shutil.copytree(source / "xcm", destination / "xcm")
    (destination / store.STATE).write_text(universal_state(state).to_json())
    (destination / store.DEEPSPEED / state.deepspeed_tag).mkdir(parents=True)
    (destination / store.DEEPSPEED / state.deepspeed_tag / "converted").write_text("universal")


def test_a_forged_universal_checkpoint_is_replaced_and_a_kept_one_reused(
    tmp_path, checkpoint_files, marker, monkeypatch
):
    """A universal-00000010 planted beside a checkpoint (a pickle payload, its manifest signed with another key) is
    not used but converted again from the verified checkpoint, signed with this machine's key; the next resume
    reuses that conversion instead of converting again. The payload never runs."""
    import shutil

    from orchestrator.train import universal

    run = tmp_path / "run"
    checkpoint_files.write(run, 10)
    forged = run / store.universal_name(10)
    shutil.copytree(run / "step-00000010", forged)
    checkpoint_files.plant_payload(forged / "deepspeed" / "step-10" / "mp_rank_00_model_states.pt", marker)
    checkpoint_files.recompute_manifest(forged, key=checkpoint_files.ATTACKER_KEY)
    conversions = []
    monkeypatch.setattr(universal, "convert", lambda *args: (conversions.append(args[0]), _standin_conversion(*args)))
    located = store.verified(*store.resolve(str(run / "step-00000010")))
    converted = universal.universal_checkpoint(located)
    assert converted.path == str(forged) and converted.state == universal.universal_state(located.state)
    assert (forged / "deepspeed" / "step-10" / "converted").is_file()
    assert not (forged / "deepspeed" / "step-10" / "mp_rank_00_model_states.pt").exists()
    assert universal.universal_checkpoint(located).state == converted.state
    assert len(conversions) == 1 and not marker.exists()


def test_a_universal_checkpoint_renamed_as_another_step_is_refused(tmp_path, checkpoint_files, monkeypatch):
    """The step a universal checkpoint's name says must be the step it holds (as for step-* checkpoints)."""
    from orchestrator.train import universal

    run = tmp_path / "run"
    checkpoint_files.write(run, 10)
    monkeypatch.setattr(universal, "convert", _standin_conversion)
    universal.universal_checkpoint(store.verified(*store.resolve(str(run / "step-00000010"))))
    (run / store.universal_name(10)).rename(run / store.universal_name(20))
    with pytest.raises(store.NotIntact, match=r"holds step 10.*universal-00000010"):
        store.verified(*store.resolve(str(run / store.universal_name(20))))


def ray_checkpoint_manager(run: Path, keep_last: int):
    """Ray Train v2's own checkpoint manager of the run directory ``run`` (restoring its list when there is one)."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    return CheckpointManager(CheckpointConfig(num_to_keep=keep_last), StorageContext(str(run.parent), run.name))


def save_as_ray_does(manager, run: Path, step: int, staging: Path, checkpoint_files) -> str:
    """One save as a rank leaves it: the name xcm picks, the checkpoint's files merged into that directory of the
    run (as Ray's upload does: over whatever is there), then registered with Ray's manager; the name."""
    import shutil

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    name = store.save_name(LOCAL, str(run), step)
    written = checkpoint_files.write(staging / name, step)
    shutil.copytree(written, run / name, dirs_exist_ok=True)
    shutil.rmtree(staging / name)
    manager.register_checkpoint(_TrainingReport(Checkpoint(str(run / name)), {"step": step}, validation=False))
    return name


def test_a_checkpoint_saved_again_after_a_fallback_is_never_deleted_by_keep_last(tmp_path, checkpoint_files):
    """A run whose step 30 is found corrupted falls back to step 20 and saves step 30 again: Ray's keep_last (3) ages
    out the corrupted one without touching the new one, every checkpoint Ray lists is there and verifies, and a
    restart's Ray restores the list and finds step 60 the newest."""
    import asyncio

    run, staging = tmp_path / "job-01234567", tmp_path / "staging"

    async def train() -> list[str]:
        manager = ray_checkpoint_manager(run, keep_last=3)
        for step in (10, 20, 30):
            save_as_ray_does(manager, run, step, staging, checkpoint_files)
        shard = run / "step-00000030" / "deepspeed" / "step-30" / "mp_rank_00_model_states.pt"
        shard.write_bytes(shard.read_bytes()[:100])
        assert store.newest_intact(LOCAL, str(run)).state.step == 20  # the restarted group continues from step 20
        saved = [save_as_ray_does(manager, run, step, staging, checkpoint_files) for step in (30, 40, 50, 60)]
        await asyncio.sleep(0)  # Ray's notification tasks run
        return saved

    saved = asyncio.run(train())
    names, latest = listed(run)
    assert names == saved[-3:] and latest == saved[-1]
    assert all(store.problem(LOCAL, str(run / name)) is None for name in names)
    assert not (run / "step-00000030").exists() and (run / saved[0]).parent == run  # the corrupted one is deleted
    restarted = ray_checkpoint_manager(run, keep_last=3)  # Ray refuses a list naming a missing checkpoint
    assert store.newest_intact(LOCAL, restarted.latest_checkpoint_result.checkpoint.path).state.step == 60


def test_a_save_that_never_registered_is_replaced_and_an_unreadable_list_keeps_every_name(
    tmp_path, checkpoint_files, caplog
):
    """A step-20 directory that Ray's list does not name (a save that crashed mid-upload) is deleted and its name
    reused, so none of its files mix into the new checkpoint; with Ray's list in a shape this xcm does not know,
    an existing name is never reused nor deleted: the save takes the next generation."""
    run = tmp_path / "run"
    checkpoint_files.write(run, 10)
    leftover = checkpoint_files.write(run, 20, manifest=False)
    (run / store.RAY_SNAPSHOT).write_text(ray_list("step-00000010"))
    with caplog.at_level(logging.WARNING):
        assert store.save_name(LOCAL, str(run), 20) == "step-00000020" and not leftover.exists()
    assert "never registered" in caplog.text
    checkpoint_files.write(run, 20, manifest=False)
    (run / store.RAY_SNAPSHOT).write_text('{"ray_version": "9.9"}')
    assert store.save_name(LOCAL, str(run), 20) == "step-00000020.g1" and leftover.exists()
    assert store.save_name(LOCAL, str(run), 30) == "step-00000030"


def test_a_step_saved_again_is_newer_than_its_earlier_saves_and_older_than_the_next_step(tmp_path, checkpoint_files):
    """Generations sort by number (.g10 after .g9), all before the next step; resuming from an earlier save of a
    step sets its later saves aside; a generation renamed as another step is refused."""
    import shutil

    names = ["step-00000020", "step-00000020.g9", "step-00000020.g10"]
    assert sorted(["step-00000021", *reversed(names)], key=store.name_order) == [*names, "step-00000021"]
    assert store.name_parts("step-00000020.g01") is None and store.name_parts("step-00000020.g0") is None
    run = tmp_path / "run"
    checkpoint_files.write(run, 10)
    for name in names:
        shutil.move(checkpoint_files.write(tmp_path / name, 20), run / name)
    assert store.newest_intact(LOCAL, str(run)).path == str(run / "step-00000020.g10")
    assert store.newest_intact(LOCAL, str(run / "step-00000020.g9")).path == str(run / "step-00000020.g9")
    superseded, _ = store.set_aside_newer(store.verified(LOCAL, str(run / "step-00000020.g9")))
    assert [p.name for p in Path(superseded).iterdir()] == ["step-00000020.g10"]
    shutil.move(run / "step-00000020.g9", run / "step-00000030.g9")
    assert "holds step 20" in store.problem(LOCAL, str(run / "step-00000030.g9"))


def test_the_universal_form_of_a_step_saved_again_is_its_own(tmp_path, checkpoint_files, monkeypatch):
    """The universal form of step-20.g1 is universal-20.g1, never the one made from the earlier save of step 20."""
    import shutil

    from orchestrator.train import universal

    run = tmp_path / "run"
    checkpoint_files.write(run, 20)
    shutil.move(checkpoint_files.write(tmp_path / "again", 20), run / "step-00000020.g1")
    monkeypatch.setattr(universal, "convert", _standin_conversion)
    first = universal.universal_checkpoint(store.verified(LOCAL, str(run / "step-00000020")))
    again = universal.universal_checkpoint(store.verified(LOCAL, str(run / "step-00000020.g1")))
    assert (Path(first.path).name, Path(again.path).name) == ("universal-00000020", "universal-00000020.g1")
    assert again.state.universal and again.state.step == 20


def test_a_rollback_tags_the_steps_mlflow_keeps_from_the_abandoned_branch(tmp_path, caplog):
    """A run that logged steps 0-19, rolled back to step 10 and then to step 5: its tag, read back with MLflow's
    client, names steps 10-19 and then 5-19 as abandoned with where each branch's checkpoints went; a rollback past
    nothing logged sets none, and a run the store does not hold only warns."""
    from mlflow import MlflowClient

    from orchestrator.train.resume import ROLLBACK_TAG, mark_rollback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("rollback")).info.run_id
    for step in range(20):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
    mark_rollback(uri, run_id, 20, "run/superseded-0")
    assert ROLLBACK_TAG not in client.get_run(run_id).data.tags
    with caplog.at_level(logging.WARNING):
        mark_rollback(uri, run_id, 10, "run/superseded-1")
    assert "steps 10-19" in caplog.text and "from step 20 on" in caplog.text
    mark_rollback(uri, run_id, 5, "run/superseded-2")
    assert client.get_run(run_id).data.tags[ROLLBACK_TAG] == (
        "steps 10-19: the branch abandoned at the resume from step 10 (checkpoints run/superseded-1); "
        "steps 5-19: the branch abandoned at the resume from step 5 (checkpoints run/superseded-2)"
    )
    mark_rollback(uri, "f" * 32, 5, "run/superseded-3")
    assert "could not tag run" in caplog.text

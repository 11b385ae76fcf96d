"""Checkpoints as hostile input: nothing of a checkpoint is opened before its signed manifest verifies, no name
escapes its directory, and the key that signs them is kept private."""

import json
import os
import stat
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from orchestrator import measure
from orchestrator.train import checkpoint_store as store
from orchestrator.train.export import ExportError, export_hf
from orchestrator.train.resume import ResumeError, locate, resume_job
from tests.helpers import TINY_JOB, run_xcm

LOCAL = pafs.LocalFileSystem()
MODEL_FILE = "deepspeed/step-20/mp_rank_00_model_states.pt"


@pytest.fixture
def forged(tmp_path, checkpoint_files, marker):
    """A run whose step 10 is authentic and whose newest checkpoint (step 20, ZeRO-0, a transformers model)
    holds a pickle payload in DeepSpeed's model file, with every sha256 of its manifest recomputed."""
    run = tmp_path / "run"
    checkpoint_files.write(run, 10, zero_stage=0, transformers_model=True)
    newest = checkpoint_files.write(run, 20, zero_stage=0, transformers_model=True)
    checkpoint_files.plant_payload(newest / MODEL_FILE, marker)
    checkpoint_files.recompute_manifest(newest)
    return newest


def test_forged_checkpoint_runs_no_code_on_resume_export_or_measure(tmp_path, forged, marker):
    """A payload planted with a recomputed manifest is refused by resume, export and measure, and never runs."""
    for attempt in (
        lambda: resume_job(str(forged), tmp_path),
        lambda: export_hf(str(forged), tmp_path / "hf", "unused"),
        lambda: measure.load_model(str(forged), "unused"),
    ):
        with pytest.raises(ResumeError, match="signature does not verify"):
            attempt()
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_forged_newest_checkpoint_falls_back_to_the_authentic_previous(forged, marker, caplog):
    """A run directory whose newest checkpoint is forged resolves to the authentic one before it, with a warning."""
    located = locate(str(forged.parent), "unused")
    assert located.state.step == 10 and "signature does not verify" in caplog.text
    assert not marker.exists()


def test_checkpoint_signed_with_another_key_is_refused(forged, checkpoint_files):
    """A manifest signed with a key other than this machine's (an attacker's, another cluster's) is refused,
    naming the key variable; the same manifest verifies under the key that signed it."""
    checkpoint_files.recompute_manifest(forged, key=checkpoint_files.ATTACKER_KEY)
    with pytest.raises(ResumeError, match=r"signed with another key.*XCM_CHECKPOINT_KEY"):
        locate(str(forged), "unused")
    assert store.verified(LOCAL, str(forged), key=checkpoint_files.ATTACKER_KEY).state.step == 20


def test_format_1_checkpoint_is_refused_with_the_way_out(tmp_path, checkpoint_files):
    """A checkpoint of the unauthenticated format is refused with what to do instead."""
    directory = checkpoint_files.write(tmp_path, 10)
    manifest = json.loads((directory / store.MANIFEST).read_text())
    (directory / store.MANIFEST).write_text(json.dumps({"format": 1, "files": manifest["files"]}))
    with pytest.raises(ResumeError, match=r"predates authenticated checkpoints.*xcm export"):
        locate(str(directory), "unused")


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        "null",
        '"text"',
        "{",
        '{"format": 2}',
        "[" * 100_000 + "]" * 100_000,
        '{"format": 2, "key_id": "", "hmac": "", "files": []}',
        '{"format": 2, "key_id": "", "hmac": "", "files": {"xcm/state.json": {"size": "12", "sha256": "00"}}}',
        '{"format": 2, "key_id": "", "hmac": 5, "files": {}}',
        '{"format": "2", "key_id": "", "hmac": "", "files": {}}',
    ],
)
def test_manifest_of_the_wrong_shape_falls_back_to_the_previous(tmp_path, checkpoint_files, manifest):
    """Any manifest that is not a format-2 manifest makes its checkpoint a bad one, skipped; never a traceback."""
    checkpoint_files.write(tmp_path, 10)
    newest = checkpoint_files.write(tmp_path, 20)
    (newest / store.MANIFEST).write_text(manifest)
    assert store.problem(LOCAL, str(newest))
    assert store.newest_intact(LOCAL, str(tmp_path)).state.step == 10


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_manifest_that_is_not_a_plain_file_falls_back_to_the_previous(tmp_path, checkpoint_files, kind):
    """A manifest that is a directory, a FIFO (whose read would block forever) or a symlink is a bad checkpoint."""
    checkpoint_files.write(tmp_path, 10)
    newest = checkpoint_files.write(tmp_path, 20)
    manifest = newest / store.MANIFEST
    manifest.unlink()
    if kind == "directory":
        manifest.mkdir()
    elif kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(tmp_path / "step-00000010" / store.MANIFEST)
    assert "not a plain file" in store.problem(LOCAL, str(newest))
    assert store.newest_intact(LOCAL, str(tmp_path)).state.step == 10


def sign(directory: Path, files: dict) -> None:
    """A manifest signed with this machine's key: only the names check can stop it."""
    key = store.checkpoint_key()
    manifest = {"format": store.MANIFEST_FORMAT, "key_id": store.key_id(key), "files": files}
    manifest["hmac"] = store._signature(manifest, key)
    (directory / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "backslash", "symlink", "symlinked_directory"])
def test_names_that_leave_the_checkpoint_are_refused(tmp_path, checkpoint_files, escape):
    """A signed manifest listing `../x`, an absolute path, a backslash name, or a symlink out of the
    checkpoint (file or directory) is refused, though each named file exists with the listed size and hash."""
    directory = checkpoint_files.write(tmp_path / "run", 10)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"outside the checkpoint")
    files = store.file_records(directory)
    del files[store.MANIFEST]
    record = {"size": outside.stat().st_size, "sha256": store._sha256(LOCAL, str(outside))}
    if escape == "dotdot":
        files["../../outside.pt"] = record
    elif escape == "absolute":
        files[str(outside)] = record
    elif escape == "backslash":
        files["..\\..\\outside.pt"] = record
    elif escape == "symlink":
        (directory / "deepspeed" / "step-10" / "extra.pt").symlink_to(outside)
        files["deepspeed/step-10/extra.pt"] = record
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "extra.pt").write_bytes(outside.read_bytes())
        (directory / "deepspeed" / "linked").symlink_to(tmp_path / "elsewhere")
        files["deepspeed/linked/extra.pt"] = record
    sign(directory, files)
    reason = store.problem(LOCAL, str(directory))
    assert reason and any(word in reason for word in ("'..'", "absolute", "backslash", "symbolic link")), reason


def test_a_deepspeed_tag_that_is_not_one_plain_component_is_refused(tmp_path, checkpoint_files):
    """A state whose DeepSpeed tag climbs out (`../../..`), even in a signed checkpoint, is refused before any
    path is built from it; so is a plain tag that names no file of the manifest."""
    climbing = checkpoint_files.write(tmp_path / "a", 10, tag="../../..")
    assert "deepspeed_tag '../../..'" in store.problem(LOCAL, str(climbing))
    with pytest.raises(ResumeError, match="not a single plain path component"):
        resume_job(str(climbing), tmp_path)
    elsewhere = checkpoint_files.write(tmp_path / "b", 10, tag="step-99")
    assert "names no file" in store.problem(LOCAL, str(elsewhere))


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path, checkpoint_files, marker):
    """An extra shard dropped beside the listed ones (DeepSpeed loads shards by name pattern) is refused."""
    directory = checkpoint_files.write(tmp_path, 10)
    checkpoint_files.plant_payload(
        directory / "deepspeed" / "step-10" / "zero_pp_rank_2_mp_rank_00_optim_states.pt", marker
    )
    assert "zero_pp_rank_2_mp_rank_00_optim_states.pt is not in the manifest" in store.problem(LOCAL, str(directory))


def test_an_authentic_checkpoint_renamed_to_look_newer_is_refused(tmp_path, checkpoint_files):
    """Step 10 copied to `step-00000030` does not pass for step 30 (a rollback dressed as the newest)."""
    directory = checkpoint_files.write(tmp_path, 10)
    directory.rename(tmp_path / "step-00000030")
    assert "holds step 10" in store.problem(LOCAL, str(tmp_path / "step-00000030"))


def test_export_into_a_non_empty_directory_keeps_what_is_there(tmp_path, forged, marker):
    """`xcm export` refuses a directory with another model's files before any work, and leaves them as they were."""
    target = tmp_path / "other-model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"another model")
    with pytest.raises(ExportError, match=r"not an empty directory.*--overwrite"):
        export_hf(str(forged.parent / "step-00000010"), target, "unused")
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    with pytest.raises(ResumeError):  # --overwrite with an export that fails: the old content stays
        export_hf(str(forged), target, "unused", overwrite=True)
    assert (target / "model.safetensors").read_bytes() == b"another model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-model", "run"]  # no staging left behind
    assert not marker.exists()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """No key in the environment, and a home of this test's own."""
    monkeypatch.delenv(store.KEY_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_key_file_is_made_private_on_first_save_and_then_kept(home, checkpoint_files):
    """Without XCM_CHECKPOINT_KEY the first save makes ~/.config/xcm/checkpoint.key, 32 random bytes, mode 0600;
    later saves and verifications use the same key."""
    directory = checkpoint_files.write(home / "run", 10)
    key_file = home / ".config" / "xcm" / "checkpoint.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    key = key_file.read_bytes()
    checkpoint_files.write(home / "run", 20)
    assert key_file.read_bytes() == key
    assert store.problem(LOCAL, str(directory)) is None


def test_key_file_open_to_others_is_refused_with_the_fix(home, checkpoint_files):
    """A key file readable by the group or others is not used: the message gives the chmod that fixes it."""
    directory = checkpoint_files.write(home / "run", 10)
    key_file = home / ".config" / "xcm" / "checkpoint.key"
    key_file.chmod(0o644)
    with pytest.raises(ResumeError, match=f"open to other users .*chmod 600 {key_file}"):
        locate(str(directory), "unused")
    key_file.chmod(0o600)
    assert locate(str(directory), "unused").state.step == 10


def test_no_key_at_all_is_a_refusal_naming_the_variable(home, tmp_path):
    """Verifying on a machine with neither the variable nor a key file refuses, and creates no key."""
    with pytest.raises(ResumeError, match="no checkpoint key: set XCM_CHECKPOINT_KEY"):
        locate(str(tmp_path), "unused")
    assert not (home / ".config" / "xcm" / "checkpoint.key").exists()


def test_a_short_key_in_the_environment_is_refused(monkeypatch, tmp_path):
    """A guessable key (under 32 bytes) in XCM_CHECKPOINT_KEY is refused with how to make one."""
    monkeypatch.setenv(store.KEY_ENV, "secret")
    with pytest.raises(ResumeError, match=r"at least 32.*openssl rand"):
        locate(str(tmp_path), "unused")


def test_key_file_mode_check_is_not_defeated_by_umask(home, checkpoint_files):
    """The key file is created 0600 whatever the umask (a permissive umask would otherwise leave it readable)."""
    previous = os.umask(0)
    try:
        checkpoint_files.write(home / "run", 10)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((home / ".config" / "xcm" / "checkpoint.key").stat().st_mode) == 0o600


def test_key_from_a_secret_file_matches_the_same_key_typed_in_a_shell(monkeypatch, tmp_path, checkpoint_files):
    """A key with the trailing newline of the file it was mounted from verifies what the same key without it
    signed (a shell's `$(...)` drops the newline)."""
    monkeypatch.setenv(store.KEY_ENV, "k" * 40 + "\n")
    directory = checkpoint_files.write(tmp_path, 10)
    monkeypatch.setenv(store.KEY_ENV, "k" * 40)
    assert store.problem(LOCAL, str(directory)) is None


def test_a_worker_whose_key_differs_from_the_drivers_stops_at_once():
    """A worker on a node without the key secret (its key is not the driver's) refuses to start, naming the fix."""
    from orchestrator.ranks import Rank
    from orchestrator.spec import JobSpec
    from orchestrator.train.checkpointing import CheckpointManager

    driver_key_id = store.key_id(b"the driver's key, which this worker does not hold")
    with pytest.raises(store.CheckpointKeyError, match="differs from the driver's: set XCM_CHECKPOINT_KEY"):
        CheckpointManager(JobSpec(), rank=Rank(1, 2), run_id="r" * 32, session="s", key_id=driver_key_id)
    CheckpointManager(
        JobSpec(), rank=Rank(1, 2), run_id="r" * 32, session="s", key_id=store.key_id(store.checkpoint_key())
    )


def test_xcm_run_with_a_key_file_open_to_others_stops_before_the_run(home):
    """`xcm run` with a world-readable key file exits 1 with the chmod fix, before any MLflow run or worker."""
    key_file = home / ".config" / "xcm" / "checkpoint.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    command = run_xcm("run", str(TINY_JOB), cwd=home, timeout=300)
    assert command.returncode == 1 and f"chmod 600 {key_file}" in command.stderr
    assert "Traceback" not in command.stderr and not (home / "xcm-runs").exists()

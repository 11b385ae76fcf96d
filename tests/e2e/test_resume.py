"""Checkpoints end to end: a resumed run equals an uninterrupted one, `kill -9` recovery, a rollback to an older
checkpoint, export to Hugging Face, and a tampered checkpoint that runs no code."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator import measure, metric_names
from orchestrator.train import checkpoint_store as store
from orchestrator.train import export
from orchestrator.train.export import PARTITION_FILE, consolidated_state_dict, export_hf
from orchestrator.train.launch import run_job
from orchestrator.train.resume import ROLLBACK_TAG, ResumeError, locate, resume_job
from tests.helpers import ROOT, MetricPoint, kill_session, metric_history, run_xcm, tiny_spec

STEPS = 20


# The default job, 20 steps, partition at step 0, a checkpoint every 10 steps, no evaluation; an 8-step warm-up,
# so that a resumed run whose LR schedule restarted (at lr/8) would show in the loss.
TINY = (
    f"training.steps={STEPS}",
    "training.report_every=10",
    "checkpointing.every_steps=10",
    "training.warmup_steps=8",
    "modularity.partition_at_step=0",
    "evaluation.every_steps=0",
)


def tiny(*overrides: str):
    return tiny_spec(*TINY, *overrides)


def losses(client: MlflowClient, run_id: str) -> list[MetricPoint]:
    return metric_history(client, run_id, metric_names.LOSS)


def final_weights(checkpoint_path: str) -> dict[str, torch.Tensor]:
    located = store.newest_intact(*store.resolve(checkpoint_path))
    assert located.state.step == STEPS
    return consolidated_state_dict(Path(located.path), located.state)


def assert_same_training(client, reference, result) -> None:
    """Every step's loss logged exactly once and equal to the reference run's, and the same final weights."""
    expected, got = losses(client, reference.run_id), losses(client, result.run_id)
    assert [step for step, _ in got] == list(range(STEPS))
    for (step, want), (_, have) in zip(expected, got, strict=True):
        assert abs(want - have) <= 1e-6, (step, want, have)
    reference_weights, weights = final_weights(reference.checkpoint_path), final_weights(result.checkpoint_path)
    assert reference_weights.keys() == weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def client(workdir):
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'xcm-runs' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def uninterrupted(workdir, local_ray):
    """The reference: 20 steps in one go."""
    return run_job(tiny("name=uninterrupted"), workdir)


def spooled_loss_steps(run_directory: Path) -> set[int]:
    """The steps whose loss rank 0 has written to the run's metric spool (its whole lines: a kill may tear the last)."""
    path = run_directory / store.METRIC_SPOOL
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return {record["step"] for record in map(json.loads, lines) if metric_names.LOSS in record.get("metrics", {})}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "workers"), [("driver-killed", "2"), ("elastic-driver-killed", "[1, 2]")])
def test_killed_driver_is_resumed_to_the_uninterrupted_result(workdir, client, uninterrupted, name, workers):
    """`kill -9` of `xcm run` with all its Ray processes past a checkpoint, then `xcm resume` of the run directory:
    the same MLflow run FINISHED, the steps logged before the kill not logged twice, the same losses and weights;
    an elastic run (num_workers [1, 2], two workers here) too, its resumed group logging its size at its first step."""
    settings = [*TINY, f"name={name}", "checkpointing.every_steps=5", f"resources.num_workers={workers}"]
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "run",
        str(ROOT / "jobs" / "tiny.yaml"),
        *(argument for setting in settings for argument in ("--set", setting)),
    ]
    log = workdir / f"{name}.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        # Kill once a checkpoint (step 5 or later) is intact and rank 0 has logged a step after it, a step that
        # the resumed run recomputes and must not log again; not later, since an idle machine runs the 15 steps
        # after step 5 in about a second. Ray Train may not list that checkpoint yet (it does
        # once the workers have moved on): then only `xcm resume` knows it, and the run must still continue there.
        deadline = time.monotonic() + 300
        while True:
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            run_directory = next(workdir.glob(f"xcm-runs/checkpoints/{name}-*"), None)
            located = run_directory and store.newest_intact(*store.resolve(str(run_directory)))
            if (
                located
                and located.state.step >= 5
                and max(spooled_loss_steps(run_directory), default=-1) >= located.state.step
            ):
                break
            time.sleep(0.1)
    finally:
        kill_session(driver.pid)
        driver.wait()
    # The workers may write one more checkpoint between the check above and the SIGKILL that reaches them (5 steps
    # are quick): the resume must start from the newest intact one on disk after the kill, whichever it is.
    newest = store.newest_intact(*store.resolve(str(run_directory)))
    assert located.state.step <= newest.state.step < STEPS
    assert client.get_run(newest.state.run_id).info.status == "RUNNING"  # nobody could mark it: the driver died
    resumed = resume_job(str(run_directory), workdir)
    assert resumed.run_id == newest.state.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(resumed.run_id, metric_names.RESUMED_FROM_STEP)] == [
        (newest.state.step, float(newest.state.step))
    ]
    assert_same_training(client, uninterrupted, resumed)
    if workers != "2":  # the elastic group of each launch logs its size at its first step, the resumed one included
        assert metric_history(client, resumed.run_id, metric_names.WORKERS) == [(0, 2), (newest.state.step, 2)]


def workers(state: str) -> list:
    """The Ray Train workers of this test's own Ray in ``state`` (by address: without one the state API may pick
    another Ray running on the machine)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,
        limit=1000,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)],
    )


@pytest.mark.slow
def test_killed_worker_is_restarted_from_the_last_checkpoint(workdir, client, uninterrupted):
    """`kill -9` of a worker mid-run: Ray restarts the group, which continues from a checkpoint; same result."""
    workers_before = len(workers("ALIVE")) + len(workers("DEAD"))
    outcome: dict = {}
    job = threading.Thread(
        target=lambda: outcome.update(
            result=run_job(
                tiny(
                    "name=killed",
                    "checkpointing.every_steps=5",
                    "checkpointing.keep_last=2",
                    "checkpointing.max_failures=1",
                ),
                workdir,
            )
        )
    )
    job.start()
    # Kill once Ray Train has registered the first checkpoint (its snapshot lists it), well before the end.
    deadline = time.monotonic() + 300
    while not any(
        "step-00000005" in snapshot.read_text()
        for snapshot in workdir.glob("xcm-runs/checkpoints/killed-*/checkpoint_manager_snapshot.json")
    ):
        assert time.monotonic() < deadline and job.is_alive(), "the run never registered its first checkpoint"
        time.sleep(0.1)
    victim = workers("ALIVE")[0].pid
    os.kill(victim, signal.SIGKILL)
    job.join(600)
    result = outcome["result"]
    assert len(workers("ALIVE")) + len(workers("DEAD")) == workers_before + 4  # 2 workers, then 2 replacements
    resumed_at = client.get_metric_history(result.run_id, metric_names.RESUMED_FROM_STEP)
    assert [m.value for m in resumed_at] and all(m.value in (5, 10, 15) for m in resumed_at)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert_same_training(client, uninterrupted, result)
    run_directory = Path(result.checkpoint_path).parent
    assert (run_directory / "step-00000020").is_dir() and not (run_directory / "step-00000005").exists()  # keep 2


@pytest.mark.slow
def test_a_step_trained_again_after_a_fallback_keeps_its_checkpoint(workdir, client, uninterrupted):
    """Ray's latest checkpoint damaged and a worker killed mid-run: the restarted group falls back to the one before
    and saves the damaged step again under a name of its own, which keep_last (2) never deletes as it ages out the
    damaged one; the run FINISHED with the uninterrupted result, every checkpoint Ray lists there and intact."""
    from bench.faults import stray_checkpoints

    outcome: dict = {}
    spec = tiny(
        "name=fallback", "checkpointing.every_steps=5", "checkpointing.keep_last=2", "checkpointing.max_failures=1"
    )
    job = threading.Thread(target=lambda: outcome.update(result=run_job(spec, workdir)))
    job.start()
    deadline = time.monotonic() + 300
    while not (snapshots := list(workdir.glob("xcm-runs/checkpoints/fallback-*/" + store.RAY_SNAPSHOT))) or (
        "step-00000010" not in snapshots[0].read_text()
    ):
        assert time.monotonic() < deadline and job.is_alive(), "the run never registered step 10"
        time.sleep(0.1)
    os.kill(workers("ALIVE")[0].pid, signal.SIGKILL)  # no report completes after this: its latest stays the latest
    latest = json.loads(snapshots[0].read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    shard = max((snapshots[0].parent / latest).rglob("*optim_states.pt"), key=lambda path: path.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)
    job.join(600)
    result = outcome["result"]
    step = store.name_parts(latest).step
    resumed_at = client.get_metric_history(result.run_id, metric_names.RESUMED_FROM_STEP)
    assert [m.value for m in resumed_at] == [step - 5]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert_same_training(client, uninterrupted, result)
    assert stray_checkpoints(snapshots[0].parent) == []


@pytest.mark.slow
def test_export_loads_with_from_pretrained_and_matches_the_trained_model(tmp_path, uninterrupted):
    """The exported Hugging Face directory gives the trained model's logits, and the partition lies beside it."""
    import pyarrow.parquet as pq
    import transformers

    directory = export_hf(uninterrupted.checkpoint_path, tmp_path / "hf", tracking_uri="unused")
    exported = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    checkpoint = Path(uninterrupted.checkpoint_path)
    # The trained model as DeepSpeed's own module file holds it (ZeRO-2: rank 0 saves the whole module),
    # a different source from the optimizer partitions that zero_to_fp32 consolidates.
    trained = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(checkpoint / "xcm")
    ).eval()
    module = torch.load(checkpoint / "deepspeed" / f"step-{STEPS}" / "mp_rank_00_model_states.pt", weights_only=True)[
        "module"
    ]
    trained.load_state_dict(module)
    tokens = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, trained(tokens).logits, rtol=0, atol=1e-5)
    partition = pq.read_table(directory / PARTITION_FILE).to_pydict()
    hidden = [
        cluster for side, cluster in zip(partition["side"], partition["cluster"], strict=True) if side == "hidden"
    ]
    assert len(hidden) == 2 * 256 and set(hidden) == {0, 1, 2, 3}  # 2 blocks x MLP width 256, k = 4


@pytest.mark.slow
def test_run_id_run_directory_and_checkpoint_name_the_same_checkpoint(workdir, uninterrupted):
    """`xcm resume` finds a run's newest checkpoint from its MLflow run id as from its directory."""
    uri = f"sqlite:///{workdir / 'xcm-runs' / 'mlflow.db'}"
    run_directory = str(Path(uninterrupted.checkpoint_path).parent)
    for target in (uninterrupted.run_id, run_directory, uninterrupted.checkpoint_path):
        located = locate(target, uri)
        assert (located.path, located.state.run_id) == (uninterrupted.checkpoint_path, uninterrupted.run_id)


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_do(workdir, uninterrupted):
    """A finished run asks for more steps; a worker count that cannot keep the global batch names those that can.
    Nothing starts."""
    run_directory = str(Path(uninterrupted.checkpoint_path).parent)
    with pytest.raises(ResumeError, match=r"training\.steps"):
        resume_job(run_directory, workdir)
    with pytest.raises(ResumeError, match=r"global batch of 16 .* N in \[1, 2\]"):
        resume_job(run_directory, workdir, ["training.steps=30", "resources.num_workers=3"])
    with pytest.raises(ResumeError, match="neither a path nor an xcm run"):
        resume_job("no-such-run", workdir)
    command = run_xcm("resume", run_directory, cwd=workdir, timeout=300)
    assert command.returncode == 1 and "already trained all 20 steps" in command.stderr


@pytest.mark.slow
def test_resuming_an_older_checkpoint_continues_exactly_there(workdir, client, uninterrupted):
    """`xcm resume RUN/step-00000010` of a run that reached step 20 continues at step 10 (Ray's list names step
    20), ends with the uninterrupted run's weights, and leaves the abandoned steps 15 and 20 whole, aside; MLflow
    holds each step once and the run's tag names steps 10-19 as the abandoned branch's."""
    first = run_job(tiny("name=rollback", "checkpointing.every_steps=5", "checkpointing.keep_last=4"), workdir)
    run_directory = Path(first.checkpoint_path).parent
    abandoned = store.verified(*store.resolve(first.checkpoint_path))
    resumed = resume_job(str(run_directory / "step-00000010"), workdir)
    assert resumed.run_id == first.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(resumed.run_id, metric_names.RESUMED_FROM_STEP)] == [
        (10, 10.0)
    ]
    assert [step for step, _ in losses(client, resumed.run_id)] == list(range(STEPS))
    tag = client.get_run(resumed.run_id).data.tags[ROLLBACK_TAG]
    assert tag.startswith("steps 10-19: the branch abandoned at the resume from step 10 (checkpoints ")
    reference, weights = final_weights(uninterrupted.checkpoint_path), final_weights(resumed.checkpoint_path)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    superseded = next(run_directory.glob(f"{store.SUPERSEDED_PREFIX}*"))
    assert sorted(p.name for p in superseded.iterdir() if p.name.startswith("step-")) == [
        "step-00000015",
        "step-00000020",
    ]
    aside = store.verified(*store.resolve(str(superseded / "step-00000020")))
    assert aside.state == abandoned.state
    assert store.verified(*store.resolve(resumed.checkpoint_path)).state.session != abandoned.state.session


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "precision"), [(3, "bf16"), (2, "bf16")])
def test_resume_continues_exactly_at_every_sharding_and_precision(workdir, zero_stage, precision):
    """A run resumed from its step-10 checkpoint ends at step 20 with the same loss and the same (fp32 master)
    weights as its own first, uninterrupted branch, under ZeRO-3 (parameters sharded) and in bf16 too."""
    first = run_job(
        tiny(
            f"name=exact-z{zero_stage}-{precision}",
            f"deepspeed.zero_stage={zero_stage}",
            f"training.precision={precision}",
        ),
        workdir,
    )
    run_directory = Path(first.checkpoint_path).parent
    resumed = resume_job(str(run_directory / "step-00000010"), workdir)
    assert resumed.run_id == first.run_id
    assert resumed.metrics["step"] == first.metrics["step"] == STEPS - 1
    assert resumed.metrics[metric_names.LOSS] == first.metrics[metric_names.LOSS]
    uninterrupted_branch = next(run_directory.glob(f"{store.SUPERSEDED_PREFIX}*")) / "step-00000020"
    reference, weights = final_weights(str(uninterrupted_branch)), final_weights(resumed.checkpoint_path)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero",
    # ZeRO-2's conversion and universal load run in tests/e2e/test_elastic.py (a group shrunk to one worker).
    [("deepspeed.zero_stage=1",), ("deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0")],
    ids=["zero1", "zero3"],
)
def test_resume_onto_fewer_workers_goes_through_a_universal_checkpoint(workdir, client, zero):
    """`xcm resume RUN/step-00000010 --set resources.num_workers=1` of a 2-worker run at ZeRO-1 or 3 (every weight
    sharded) converts that checkpoint once to DeepSpeed's universal form, beside it and signed; one worker
    accumulating 2 micro-batches keeps the global batch and the data order, so the run ends at step 20 with its own
    2-worker branch's weights (to float tolerance: the sums run in another order; a step's logged loss is one
    micro-batch's, not comparable)."""
    first = run_job(tiny(f"name=resized-{zero[0][-1]}", *zero), workdir)
    run_directory = Path(first.checkpoint_path).parent
    resumed = resume_job(str(run_directory / "step-00000010"), workdir, ["resources.num_workers=1"])
    assert resumed.run_id == first.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    universal = store.verified(*store.resolve(str(run_directory / store.universal_name(10))))
    assert universal.state.universal and universal.state.world_size == 2
    end = store.verified(*store.resolve(resumed.checkpoint_path))
    assert (end.state.world_size, end.state.data_position, end.state.universal) == (1, 40, False)
    branch = next(run_directory.glob(f"{store.SUPERSEDED_PREFIX}*")) / "step-00000020"
    reference, weights = final_weights(str(branch)), final_weights(resumed.checkpoint_path)
    start = consolidated_state_dict(run_directory / "step-00000010", universal.state)
    moved = max((reference[name] - start[name]).abs().max().item() for name in reference)
    apart = max((reference[name] - weights[name]).abs().max().item() for name in reference)
    assert apart < 1e-4 < moved, (apart, moved)  # the 10 steps moved weights by `moved`; the branches agree


@pytest.mark.slow
def test_tampered_checkpoint_runs_no_code_anywhere(tmp_path, workdir, uninterrupted, checkpoint_files, marker):
    """A pickle payload planted over a rank's optimizer shard of a real checkpoint, with every sha256 of the
    manifest recomputed, is refused by export, measure, and the workers themselves when handed it directly
    (as if the driver's check were bypassed): the payload never runs."""
    tampered = tmp_path / "run" / "step-00000020"
    shutil.copytree(uninterrupted.checkpoint_path, tampered)
    checkpoint_files.plant_payload(
        tampered / "deepspeed" / "step-20" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker
    )
    checkpoint_files.recompute_manifest(tampered)
    with pytest.raises(ResumeError, match="signature does not verify"):
        export_hf(str(tampered), tmp_path / "hf", "unused")
    with pytest.raises(ResumeError, match="signature does not verify"):
        measure.load_model(str(tampered), "unused")
    with pytest.raises(Exception) as refused:  # noqa: PT011 - Ray Train may wrap the error; the assert reads both
        run_job(
            tiny("name=tampered", "training.steps=30", "checkpointing.max_failures=0"),
            workdir,
            resume_from=str(tampered),
        )
    assert "does not verify" in str(refused.value) or "does not verify" in repr(refused.value.__cause__)
    assert not marker.exists()


@pytest.mark.slow
def test_export_replaces_a_directory_only_when_told_and_only_when_complete(tmp_path, uninterrupted, monkeypatch):
    """`xcm export` refuses a non-empty directory (exit 1, its file kept); with --overwrite an export that
    fails midway leaves the previous content, and one that completes replaces it, leaving no staging behind."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("another model's file")
    command = run_xcm("export", uninterrupted.checkpoint_path, "--to", "hf", str(target), cwd=tmp_path, timeout=300)
    assert command.returncode == 1 and "--overwrite" in command.stderr
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    def fail_after_the_weights(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(export, "_write_partition", fail_after_the_weights)
        with pytest.raises(OSError, match="disk full"):
            export_hf(uninterrupted.checkpoint_path, target, "unused", overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    export_hf(uninterrupted.checkpoint_path, target, "unused", overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

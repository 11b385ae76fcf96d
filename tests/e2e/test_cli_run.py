"""The `xcm` command as a user types it: the default job end to end, and bad input."""

import re

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import ROOT, TINY_JOB, run_xcm


@pytest.mark.slow
def test_xcm_run_default_job_prints_run_and_ui_command(tmp_path):
    """`xcm run jobs/tiny.yaml` trains, tracks a FINISHED run in ./xcm-runs and prints its id and the UI command;
    off a terminal the progress comes as plain lines, and Ray's worker lines go to the log file, not the output."""
    result = run_xcm(
        "run", str(TINY_JOB), "--set", "training.steps=12", "--set", "training.report_every=12", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = next(line.split()[2] for line in result.stdout.splitlines() if line.startswith("xcm: run "))
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    assert re.search(r"^\[xcm \d\d:\d\d:\d\d\] step 12/12 \| loss ", result.stdout, re.MULTILINE), result.stdout
    for noise in ("RayTrainWorker", "TrainController", "Reporting training result"):
        assert noise not in result.stdout + result.stderr, noise
    assert "RayTrainWorker" in (tmp_path / "xcm-runs" / "checkpoints" / f"tiny-{run_id[:8]}" / "xcm.log").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "task_loss")) == 12


def test_invalid_job_file_exits_2_with_every_problem(tmp_path):
    """A bad job file stops `xcm run` before anything starts, exit code 2, problems on stderr."""
    job = tmp_path / "bad.yaml"
    job.write_text("model:\n  family: gpt5\ntraining:\n  stepz: 3\n")
    result = run_xcm("run", str(job), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "model.family" in result.stderr and "training.stepz" in result.stderr
    assert not (tmp_path / "xcm-runs").exists()


def test_check_validates_shipped_jobs(tmp_path):
    """`xcm check` accepts every shipped job file; offline (as in the tests) it refuses each GPU job that fine-tunes
    a hub model, naming the model to cache, and still reports every file."""
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    hub_models = {job: yaml.safe_load(job.read_text())["model"].get("pretrained") for job in jobs}
    result = run_xcm("check", *map(str, jobs), cwd=tmp_path, timeout=120)
    assert result.returncode == (2 if any(hub_models.values()) else 0), result.stderr
    for job, model in hub_models.items():
        if model:
            assert f"hub model {model!r} is not in the local cache" in result.stderr
        else:
            assert f"{job}: ok" in result.stdout


@pytest.mark.parametrize(
    ("job_text", "problem"),
    [
        (
            "data:\n  source: files\n  files: [corpus/*.txt]\n  validation_fraction: 0.1\n",
            "data.files: no file matches",
        ),
        ("training:\n  lr: .inf\n", "training.lr: input should be a finite number"),
        ("model:\n  config:\n    n_embed: 32\n", "model.config.n_embed: GPT2Config has no key 'n_embed'"),
        ("", "the job file is empty"),
    ],
    ids=["absent data file", "infinite lr", "unknown config key", "empty file"],
)
def test_check_and_run_refuse_an_invalid_job_alike(tmp_path, job_text, problem):
    """`xcm check` and `xcm run` give the same line and the same exit code (2) for the same invalid job, absent
    data files included, and `run` creates nothing."""
    job = tmp_path / "job.yaml"
    job.write_text(job_text)
    checked, ran = (run_xcm(verb, str(job), cwd=tmp_path, timeout=120) for verb in ("check", "run"))
    assert checked.returncode == ran.returncode == 2, (checked.stderr, ran.stderr)
    assert checked.stderr == ran.stderr and problem in ran.stderr
    assert len(ran.stderr.splitlines()) == 1 and ran.stderr.startswith(f"{job}:")
    assert not (tmp_path / "xcm-runs").exists()


def test_ray_that_cannot_start_ends_the_run_failed(tmp_path):
    """When Ray cannot be joined (here a RAY_ADDRESS with no port), the run created a moment before ends FAILED
    with Ray's error in its xcm.failure tag instead of staying RUNNING."""
    result = run_xcm("run", str(TINY_JOB), cwd=tmp_path, timeout=300, env={"RAY_ADDRESS": "127.0.0.1:noport"})
    assert result.returncode != 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("xcm-tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert "Unable to parse port number from noport" in run.data.tags["xcm.failure"]

"""`xcm experiment` end to end on the local Ray: variants × seeds as Ray Tune trials, each a Ray Train run and a
child MLflow run of the experiment's parent run, the comparison in the parent's artifacts; a trial whose
training worker is killed is retried by Tune and continues its run from its checkpoint."""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.cli import main
from orchestrator.experiments import report as reporting
from orchestrator.experiments.plan import load_experiment
from orchestrator.experiments.tuning import PREVIOUS_FAILURE_TAG, STOPPED_REASON, run_experiment
from orchestrator.tracking import FAILURE_TAG

ROOT = Path(__file__).resolve().parents[2]


def experiment_file(workdir: Path, text: str) -> Path:
    """An experiment file in ``workdir/experiments/`` on a copy of the default job beside that directory."""
    (workdir / "experiments").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "jobs" / "tiny.yaml", workdir / "tiny.yaml")
    path = workdir / "experiments" / "experiment.yaml"
    path.write_text(text)
    return path


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`{reporting.PARENT_TAG}` = '{parent_run_id}'")


@pytest.mark.slow
def test_two_variants_by_two_seeds_run_as_tune_trials_under_one_parent_run(tmp_path, local_ray):
    """A 2 × 2 experiment of 6-step tiny jobs of one worker each: one parent run that records the file, four
    FINISHED child runs (one per variant and seed, each its own job), two at a time on 2 CPUs, and the comparison
    read back with MLflow's own client."""
    path = experiment_file(
        tmp_path,
        (
            "name: two-by-two\nbase: ../tiny.yaml\n"
            "overrides: {training.steps: 6, training.report_every: 6, evaluation.every_steps: 6,\n"
            "            evaluation.max_batches: 1, tracking.log_every_steps: 3, resources.num_workers: 1,\n"
            "            tracking.log_model: false}\n"
            "variants:\n  control: {modularity.lambda: 0}\n  clustered: {modularity.lambda: 40}\nseeds: [0, 1]\n"
        ),
    )
    result = run_experiment(load_experiment(path), tmp_path)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert result.failed_trials == [] and parent.info.status == "FINISHED"
    assert parent.data.params["experiment.variants.clustered.modularity.lambda"] == "40"
    assert parent.data.tags[reporting.EXPERIMENT_TAG] == "two-by-two"
    children = child_runs(client, result.parent_run_id)
    trials = sorted(
        (
            run.data.tags[reporting.VARIANT_TAG],
            int(run.data.tags[reporting.SEED_TAG]),
            run.data.params["modularity.lambda"],
            run.data.params["training.seed"],
            run.info.status,
        )
        for run in children
    )
    assert trials == [
        ("clustered", 0, "40.0", "0", "FINISHED"),
        ("clustered", 1, "40.0", "1", "FINISHED"),
        ("control", 0, "0.0", "0", "FINISHED"),
        ("control", 1, "0.0", "1", "FINISHED"),
    ]
    assert all(metric_names.CLUSTERABILITY in run.data.metrics for run in children)
    spans = sorted((run.info.start_time, run.info.end_time) for run in children)
    assert any(later_start < end for (_, end), (later_start, _) in itertools.pairwise(spans)), spans  # side by side
    artifacts = Path(client.download_artifacts(result.parent_run_id, "", str(tmp_path / "downloaded")))
    assert "clustered: {modularity.lambda: 40}" in (artifacts / "experiment" / "experiment.yaml").read_text()
    markdown = (artifacts / "comparison" / "comparison.md").read_text()
    assert "## clusterability" in markdown and "## eval/loss" in markdown and "## tokens_per_s" in markdown
    rows = pq.read_table(artifacts / "comparison" / "tables" / "clusterability.parquet").to_pylist()
    clustered = next(row for row in rows if row["variant"] == "clustered")
    finals = {
        (run.data.tags[reporting.VARIANT_TAG], run.data.tags[reporting.SEED_TAG]): run.data.metrics[
            metric_names.CLUSTERABILITY
        ]
        for run in children
    }
    expected = sum(finals["clustered", s] - finals["control", s] for s in ("0", "1")) / 2
    assert clustered["pairs"] == 2 and clustered["difference"] == pytest.approx(expected)
    assert [png.name for png in (artifacts / "comparison").glob("*.png")] == ["tradeoff-eval__perplexity.png"]


@pytest.mark.slow
def test_trial_whose_worker_is_killed_is_retried_and_the_experiment_finishes(tmp_path, local_ray):
    """`kill -9` of a training worker past the first checkpoint fails that trial's Ray Train run (it allows no
    worker restarts); Tune retries the trial, which continues the same child run from its checkpoint."""
    import ray
    from ray.util.state import list_actors

    path = experiment_file(
        tmp_path,
        (
            "name: killed\nbase: ../tiny.yaml\n"
            "overrides: {training.steps: 20, training.report_every: 5, checkpointing.every_steps: 5,\n"
            "            checkpointing.max_failures: 0, evaluation.every_steps: 0, tracking.log_model: false}\n"
            "variants: {control: {modularity.lambda: 0}}\nseeds: [0]\nmax_failures: 1\n"
        ),
    )
    outcome: dict = {}
    experiment = threading.Thread(target=lambda: outcome.update(result=run_experiment(load_experiment(path), tmp_path)))
    experiment.start()
    deadline = time.monotonic() + 240
    while not any(
        "step-00000005" in snapshot.read_text()
        for snapshot in tmp_path.glob("xcm-runs/checkpoints/tiny-control-s0-*/checkpoint_manager_snapshot.json")
    ):
        assert time.monotonic() < deadline and experiment.is_alive(), "the trial never registered a checkpoint"
        time.sleep(0.1)
    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        limit=1000,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    os.kill(workers[0].pid, signal.SIGKILL)
    experiment.join(600)
    result = outcome["result"]
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert result.failed_trials == []
    [child] = child_runs(client, result.parent_run_id)
    assert child.info.status == "FINISHED" and FAILURE_TAG not in child.data.tags
    assert "WorkerGroupError" in child.data.tags[PREVIOUS_FAILURE_TAG]  # the first attempt, and why it failed
    resumed = client.get_metric_history(child.info.run_id, metric_names.RESUMED_FROM_STEP)
    assert [m.value for m in resumed] and all(m.value in (5, 10, 15) for m in resumed)
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, metric_names.LOSS)) == list(range(20))
    assert list(tmp_path.glob("xcm-runs/checkpoints/experiment-killed-*/*/error.txt"))  # Tune's record of the failure
    report = Path(client.download_artifacts(result.parent_run_id, "comparison/comparison.md", str(tmp_path / "r")))
    assert "| control | 1 |" in report.read_text()  # the retried trial counts, once


@pytest.mark.slow
def test_ctrl_c_of_xcm_experiment_ends_the_running_child_and_the_parent_killed(tmp_path):
    """SIGINT to `xcm experiment` while its first trial trains: Tune stops the trial, and its child run and the
    parent run end KILLED (the child saying why), not RUNNING; the trial not yet started has no run; the command
    exits 130, as an interrupted command does."""
    path = experiment_file(
        tmp_path,
        (
            "name: interrupted\nbase: ../tiny.yaml\n"
            "overrides: {training.steps: 100000, evaluation.every_steps: 0, tracking.log_every_steps: 1,\n"
            "            resources.num_workers: 2}\n"
            "variants:\n  control: {modularity.lambda: 0}\n  clustered: {modularity.lambda: 40}\nseeds: [0]\n"
        ),
    )
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    log = tmp_path / "xcm.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "experiment", str(path)],
            cwd=tmp_path,
            env={**environment, "PYTHONPATH": str(ROOT)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
        deadline = time.monotonic() + 480
        while not (training := _training_children(client)):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, log.read_text()[-3000:]
    [child] = training
    parent_run_id = child.data.tags[reporting.PARENT_TAG]
    assert client.get_run(parent_run_id).info.status == "KILLED"
    children = {run.info.run_id: run for run in child_runs(client, parent_run_id)}
    stopped = children[child.info.run_id]
    assert stopped.info.status == "KILLED" and stopped.data.tags[FAILURE_TAG] == STOPPED_REASON
    assert len(children) == 1, [(run.data.tags, run.info.status) for run in children.values()]


def _training_children(client: MlflowClient) -> list:
    """The child runs that are RUNNING and have logged a training step (none while the store is not created)."""
    try:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`{reporting.PARENT_TAG}` != ''"
        )
    except Exception:  # the store's tables are not made yet
        return []
    return [run for run in runs if run.info.status == "RUNNING" and metric_names.LOSS in run.data.metrics]


@pytest.mark.slow
def test_xcm_sweep_runs_each_grid_point_as_a_child_run_against_the_lambda_zero_point(
    tmp_path, local_ray, monkeypatch, capsys
):
    """`xcm sweep JOB --grid modularity.lambda=0,40 --seeds 1` of 4-step tiny jobs: two FINISHED child runs of
    one parent run, each trained with its grid value, and the λ = 40 point compared against the λ = 0 point."""
    shutil.copy(ROOT / "jobs" / "tiny.yaml", tmp_path / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    overrides = ["training.steps=4", "training.report_every=4", "evaluation.every_steps=0"]
    overrides += ["tracking.log_every_steps=2", "resources.num_workers=1"]
    arguments = ["sweep", "tiny.yaml", "--grid", "modularity.lambda=0,40", "--seeds", "1"]
    assert main([*arguments, *(f"--set={override}" for override in overrides)]) == 0
    parent_run_id = capsys.readouterr().out.split("xcm: experiment run ", 1)[1].split(":", 1)[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    assert client.get_run(parent_run_id).data.params["experiment.grid.modularity.lambda"] == "0,40"
    trials = sorted(
        (run.data.tags[reporting.VARIANT_TAG], run.data.params["modularity.lambda"], run.info.status)
        for run in child_runs(client, parent_run_id)
    )
    assert trials == [("lambda0", "0.0", "FINISHED"), ("lambda40", "40.0", "FINISHED")]
    rows = reporting.build_report(client, parent_run_id).tables[metric_names.CLUSTERABILITY]
    assert [(row["variant"], row["control"], row["pairs"]) for row in rows] == [
        ("lambda0", "", 0),
        ("lambda40", "lambda0", 1),
    ]

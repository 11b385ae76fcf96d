"""Whole-job runs of the default path: YAML -> Ray Train workers -> DeepSpeed ZeRO -> MLflow."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import FAILURE_TAG
from orchestrator.train.launch import run_job
from tests.helpers import metric_values, tiny_spec

STEPS = 40


def tiny_run(workdir: Path, *overrides: str):
    spec = tiny_spec(f"training.steps={STEPS}", f"training.report_every={STEPS}", *overrides)
    return run_job(spec, workdir)


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory, local_ray):
    """The tiny job with the clusterability loss on (lambda 20) and its control (lambda 0, logging every 4th
    step), in one store."""
    workdir = tmp_path_factory.mktemp("paired")
    clustered = tiny_run(workdir, "name=clustered")
    control = tiny_run(workdir, "name=control", "modularity.lambda=0", "tracking.log_every_steps=4")
    return clustered, control, MlflowClient(tracking_uri=clustered.tracking_uri)


@pytest.mark.slow
def test_loss_raises_clusterability_only_when_on(paired_runs):
    """Task loss falls with and without the loss; clusterability ends far above 1/k only with it on. The control
    logged the steps that ``tracking.log_every_steps`` asks for, and the last."""
    clustered, control, client = paired_runs
    k = 4
    every_fourth = sorted({0, *range(3, STEPS, 4), STEPS - 1})  # the first, after every 4th, the last
    for result, logged_steps in ((clustered, list(range(STEPS))), (control, every_fourth)):
        for key in ("task_loss", "step_time_s"):  # step_time_s: the mean over the steps since the last logged one
            assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == logged_steps, key
        task_loss = metric_values(client, result.run_id, "task_loss")
        assert sum(task_loss[-3:]) / 3 < task_loss[0] - 1.0, task_loss
    clustered_c = metric_values(client, clustered.run_id, "clusterability")
    control_c = metric_values(client, control.run_id, "clusterability")
    assert clustered_c[-1] > 0.7 > 1 / k
    assert control_c[-1] < 0.45
    assert clustered_c[-1] > clustered_c[0] + 0.3


@pytest.mark.slow
def test_run_is_tracked_completely(paired_runs):
    """The MLflow run is FINISHED with the resolved spec, per-layer metrics, throughput, the partition and a
    checkpoint."""
    clustered, _, client = paired_runs
    run = client.get_run(clustered.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["modularity.lambda"] == "20.0"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    layers = [key for key in run.data.metrics if key.startswith("clusterability/transformer.")]
    assert len(layers) == 4  # c_fc and c_proj of 2 blocks
    for key in ("loss", "task_loss", "clusterability", "tokens_per_s", *layers):
        assert len(metric_values(client, clustered.run_id, key)) == STEPS, key
    assert min(metric_values(client, clustered.run_id, "tokens_per_s")) > 0
    artifacts = [item.path for item in client.list_artifacts(clustered.run_id, "partitions")]
    assert artifacts == ["partitions/partition-step0.parquet"]
    assert clustered.checkpoint_path and any(Path(clustered.checkpoint_path).rglob("*model_states.pt"))


@pytest.mark.slow
def test_worker_error_marks_run_failed(tmp_path, local_ray):
    """An error inside the workers ends the MLflow run FAILED with the error as its xcm.failure tag, and reaches
    the caller."""
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever Ray Train raises; the run's status is the point
        tiny_run(tmp_path, "name=broken", "data.num_examples=20", "training.micro_batch_size=64")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xcm-tiny").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "hold no global batch of 128 (micro_batch_size=64" in runs[0].data.tags[FAILURE_TAG]  # the worker.s error

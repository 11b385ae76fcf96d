"""MLflow may fail: a tracking server that goes down mid-run delays the run's metrics and loses none."""

import threading
import time

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.tracking import TrackingUnavailable
from orchestrator.train import checkpoint_store as store
from orchestrator.train.launch import run_job
from tests.helpers import free_port, tiny_spec

STEPS = 40


@pytest.fixture
def server(mlflow_server):
    return mlflow_server()


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_reach_it_afterwards(tmp_path, server, local_ray):
    """Training goes on through a server outage; afterwards every step's metrics are in MLflow, once."""
    spec = tiny_spec(
        f"training.steps={STEPS}",
        f"training.report_every={STEPS}",
        "evaluation.every_steps=0",
        f"tracking.uri={server.uri}",
        "tracking.experiment=outage",
    )
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(result=run_job(spec, tmp_path)))
    job.start()

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 300
        while not condition():
            assert time.monotonic() < deadline and job.is_alive(), what
            time.sleep(0.1)

    # The run directory appears when Ray Train starts, after the driver's last MLflow call before training.
    wait_for(lambda: any(tmp_path.glob("xcm-runs/checkpoints/tiny-*")), "Ray Train never started")
    server.stop()
    down_ms = time.time() * 1000
    wait_for(
        lambda: any(
            spool.read_text().count('"step"') >= 5
            for spool in tmp_path.glob(f"xcm-runs/checkpoints/tiny-*/{store.METRIC_SPOOL}")
        ),
        "no steps trained while the server was down",
    )
    server.start()  # down until it answers again
    up_ms = time.time() * 1000
    job.join(600)
    run_id = outcome["result"].run_id
    client = MlflowClient(tracking_uri=server.uri)
    history = client.get_metric_history(run_id, metric_names.LOSS)
    assert sorted(m.step for m in history) == list(range(STEPS))
    for key in (metric_names.TASK_LOSS, metric_names.CLUSTERABILITY):
        assert len(client.get_metric_history(run_id, key)) == STEPS, key
    assert sum(down_ms <= m.timestamp <= up_ms for m in history) >= 5
    assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_at_start_fails_before_training(tmp_path):
    """With the tracking server down when a run starts, nothing starts and the error names the fix."""
    port = free_port()
    spec = tiny_spec(f"tracking.uri=http://127.0.0.1:{port}")
    with pytest.raises(TrackingUnavailable, match="Start the tracking server"):
        run_job(spec, tmp_path)
    assert not (tmp_path / "xcm-runs" / "checkpoints").exists()

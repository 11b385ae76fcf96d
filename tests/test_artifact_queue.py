"""Rank 0's artifact uploads: queued and written by the logger's artifact thread, so they never cost a training step."""

import time

from mlflow import MlflowClient

from orchestrator import tracking
from orchestrator.spec import TrackingSpec


def test_artifacts_are_queued_and_uploaded_by_close(tmp_path):
    """Artifact calls return at once (a 1 s writer, a file deleted right after) and all are in the run after close."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(
        TrackingSpec(uri=uri, artifact_location=(tmp_path / "artifacts").as_uri()), "artifacts", {}
    )
    logger = tracking.MetricLogger(uri, run_id, tmp_path / "spool.jsonl", interval_s=0.2)
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")

    def slow_writer(directory):
        time.sleep(1.0)  # e.g. drawing a heatmap
        (directory / "picture.png").write_bytes(b"\x89PNG")

    started = time.perf_counter()
    logger.log_artifact(str(table), "tables")
    logger.log_artifacts_from(slow_writer, "heatmaps/version-1")
    queued_s = time.perf_counter() - started
    table.unlink()
    logger.close()
    assert queued_s < 0.1
    client = MlflowClient(tracking_uri=uri)
    assert [item.path for item in client.list_artifacts(run_id, "tables")] == ["tables/table.csv"]
    assert [item.path for item in client.list_artifacts(run_id, "heatmaps/version-1")] == [
        "heatmaps/version-1/picture.png"
    ]
    assert (tmp_path / "artifacts").exists()

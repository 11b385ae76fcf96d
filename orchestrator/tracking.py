"""MLflow tracking: the driver opens and closes the run; rank 0 logs into it, batched and off the step path.

Shaped after Composer's MLflowLogger: one run per job, created by the driver so a failure anywhere can still
mark it FAILED; rank 0 queues metrics and a background thread sends them with ``log_batch`` (one HTTP call
costs ~60 ms, so per-metric calls from the loop would dominate a tiny model's step).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from orchestrator.spec import TrackingSpec

logger = logging.getLogger(__name__)

# MLflow retries a dead server for ~4 minutes by default; xcm would rather report it at once.
_CLIENT_ENVIRONMENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before training starts."""


def client(uri: str) -> MlflowClient:
    for key, value in _CLIENT_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(tracking: TrackingSpec, run_name: str, params: dict[str, str]) -> str:
    """Create the job's MLflow run (and its experiment when new), log the resolved spec, return the run id."""
    if tracking.uri.startswith("sqlite:///"):
        Path(tracking.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow = client(tracking.uri)
    try:
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         mlflow.create_experiment(tracking.experiment, artifact_location=tracking.artifact_location))
        run = mlflow.create_run(experiment_id, run_name=run_name, tags={"xcm.job": run_name})
    except Exception as error:  # mlflow raises several types for an unreachable or broken store
        raise TrackingUnavailable(
            f"MLflow tracking store {tracking.uri} cannot be used ({type(error).__name__}: {error}). "
            "Start the tracking server, or set tracking.uri in the job file (omit it for a local SQLite store)."
        ) from error
    from mlflow.entities import Param

    items = [Param(key, value[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED; a store that is gone by now is logged, not raised."""
    try:
        client(uri).set_terminated(run_id, status=status)
    except Exception as error:
        logger.warning("could not mark MLflow run %s %s: %s", run_id, status, error)


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server URI is already a UI)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class MetricLogger:
    """Rank 0's logger: ``log`` only enqueues; a daemon thread sends batches every ``interval_s``.

    A failed send keeps the batch and retries on the next round, so a brief store outage loses nothing;
    ``close`` drains the queue before the run is marked finished.
    """

    def __init__(self, uri: str, run_id: str, interval_s: float = 1.0):
        self._client = client(uri)
        self._run_id = run_id
        self._interval_s = interval_s
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []
        self._stop = threading.Event()
        self._close_timeout_s = 60.0
        self._thread = threading.Thread(target=self._send_forever, name="xcm-mlflow", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put(Metric(key, float(value), timestamp, step))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Artifacts are rare and large: sent directly, and a failure is logged rather than stopping training."""
        try:
            self._client.log_artifact(self._run_id, local_path, artifact_path)
        except Exception as error:
            logger.warning("could not log artifact %s: %s", local_path, error)

    def close(self, timeout_s: float = 60.0) -> None:
        """Send what is queued, retrying for up to ``timeout_s``; report what could not be sent."""
        self._close_timeout_s = timeout_s
        self._stop.set()
        self._thread.join(timeout_s + self._interval_s + 5)
        unsent = len(self._pending) + self._queue.qsize()
        if unsent:
            logger.warning("MLflow logger closed with %d unsent metrics", unsent)

    def _send_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._send_pending()
        deadline = time.monotonic() + self._close_timeout_s
        while not self._send_pending() and time.monotonic() < deadline:
            time.sleep(self._interval_s)

    def _send_pending(self) -> bool:
        """Send everything queued; True when nothing is left, False when the store refused a batch."""
        while not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        while self._pending:
            batch = self._pending[:_MAX_BATCH]
            try:
                self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            except Exception as error:
                logger.warning("MLflow log_batch failed (%s); %d metrics kept for retry", error, len(self._pending))
                return False
            del self._pending[:len(batch)]
        return True

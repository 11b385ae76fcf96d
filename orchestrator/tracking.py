"""MLflow tracking: the driver opens and closes the run; rank 0 logs into it, batched and off the step path.

Shaped after Composer's MLflowLogger: one run per job, created by the driver so a failure anywhere can still
mark it FAILED; rank 0 spools metrics to local disk and a sender process (``metric_sender``) sends them with
``log_batch`` (every call is an HTTP round trip, so per-metric calls from the loop would dominate a tiny model's
step).

The tracking store must answer when a run starts or resumes (``start_run``/``attach_run`` raise
``TrackingUnavailable`` at once, before any worker starts: a run with no MLflow run would have nowhere to put
its metrics); once training runs, an outage only delays them (see ``metric_spool``).
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import credentials
from orchestrator.credentials import redact

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlflow import MlflowClient

    from orchestrator.spec import TrackingSpec

logger = logging.getLogger(__name__)

# MLflow retries a dead server for ~4 minutes by default; xcm would rather report it at once.
_CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# Why a run ended FAILED (or KILLED) before or while training: the error, set by fail_run.
FAILURE_TAG = "xcm.failure"
_MAX_TAG_CHARACTERS = 5000  # the smallest limit of MLflow's stores
# A metric sender that died is restarted by the next log call, at most this often (the spool holds the metrics).
_SENDER_RESTART_S = 30.0


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before training starts."""


def client(uri: str) -> MlflowClient:
    for key, value in _CLIENT_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_local_store(uri: str) -> None:
    """A SQLite store's directory must exist before MLflow opens the file."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def start_run(tracking: TrackingSpec, run_name: str, params: dict[str, str]) -> str:
    """Create the job's MLflow run (and its experiment when new), log the resolved spec, return the run id."""
    prepare_local_store(tracking.uri)
    mlflow = client(tracking.uri)
    try:
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else mlflow.create_experiment(tracking.experiment, artifact_location=tracking.artifact_location)
        )
        run = mlflow.create_run(experiment_id, run_name=run_name, tags={"xcm.job": run_name})
    except Exception as error:  # mlflow raises several types for an unreachable or broken store
        raise TrackingUnavailable(
            redact(
                f"MLflow tracking store {tracking.uri} cannot be used ({type(error).__name__}: {error}). "
                "Start the tracking server, or set tracking.uri in the job file (omit it for a local SQLite store)."
            )
        ) from error
    from mlflow.entities import Param

    items = [Param(key, value[:6000]) for key, value in params.items()]
    try:
        for start in range(0, len(items), 100):
            mlflow.log_batch(run.info.run_id, params=items[start : start + 100])
    except Exception as error:  # the run exists now: it must not stay RUNNING
        fail_run(tracking.uri, run.info.run_id, f"params not logged: {type(error).__name__}: {error}")
        raise TrackingUnavailable(
            f"MLflow run {run.info.run_id} in {tracking.uri} refused the job's params "
            f"({type(error).__name__}: {error}); the run is marked FAILED"
        ) from error
    return run.info.run_id


def attach_run(uri: str, run_id: str) -> str:
    """Log into a run created earlier (by ``xcm submit`` on the user's machine): mark it RUNNING again."""
    mlflow = client(uri)
    try:
        mlflow.update_run(run_id, status="RUNNING")
    except Exception as error:
        raise TrackingUnavailable(
            redact(
                f"MLflow run {run_id} cannot be used in {uri} ({type(error).__name__}: {error}). "
                "Check tracking.run_id and tracking.uri, or omit tracking.run_id to start a new run."
            )
        ) from error
    return run_id


def log_resolved_spec(uri: str, run_id: str, spec_yaml: str) -> None:
    """The resolved job as the artifact ``spec.yaml``: exactly what the run trained, runnable again as a job file."""
    try:
        client(uri).log_text(run_id, spec_yaml, "spec.yaml")
    except Exception as error:
        logger.warning("could not log spec.yaml to MLflow run %s: %s", run_id, error)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED; a store that is gone by now is logged, not raised."""
    try:
        client(uri).set_terminated(run_id, status=status)
    except Exception as error:
        logger.warning("could not mark MLflow run %s %s: %s", run_id, status, error)


def fail_run(uri: str, run_id: str, reason: str, status: str = "FAILED") -> None:
    """End the run FAILED (or KILLED) with ``reason`` as its FAILURE_TAG, so a run that never trained says why
    (an error can quote a URI: its credentials are masked); a store that is gone by now is logged, not raised."""
    try:
        client(uri).set_tag(run_id, FAILURE_TAG, redact(reason)[:_MAX_TAG_CHARACTERS])
    except Exception as error:
        logger.warning("could not tag MLflow run %s with its failure: %s", run_id, error)
    end_run(uri, run_id, status)


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server URI is already a UI); never its credentials
    (the browser asks for them)."""
    uri = credentials.strip(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    uri = credentials.strip(uri)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class MetricLogger:
    """Rank 0's logger: ``log`` writes to the on-disk spool, which a sender process
    (``orchestrator.metric_sender``) moves into MLflow every ``interval_s``; ``log_artifact*`` enqueue for a
    daemon thread here, which writes and uploads them (rare, and their writers are closures).

    A failed send leaves the metrics in the spool (or the artifact in its queue) for the next round, so a
    tracking server that is down for a while loses nothing, and neither does a worker that dies: its sender
    drains the spool when the pipe from the trainer closes, and the next logger on the same spool sends what is
    left. ``close`` drains both before the run is marked finished.
    """

    def __init__(self, uri: str, run_id: str, spool_path: Path, interval_s: float = 1.0):
        from orchestrator.metric_spool import MetricSpool

        self._client = client(uri)
        self._uri, self._run_id = uri, run_id
        self._interval_s = interval_s
        self._spool = MetricSpool(spool_path)
        self._sender = self._start_sender()
        self._sender_started = time.monotonic()
        self._artifacts: queue.Queue = queue.Queue()  # (write into a directory, artifact path) pairs
        self._pending_artifacts: list = []
        self._stop = threading.Event()
        self._close_timeout_s = 60.0
        self._thread = threading.Thread(target=self._send_artifacts_forever, name="xcm-artifacts", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Spool the step's metrics (a step that a resumed run recomputes is logged only the first time)."""
        self._spool.append(metrics, step, int(time.time() * 1000))
        if self._sender.poll() is not None and time.monotonic() - self._sender_started > _SENDER_RESTART_S:
            logger.warning(
                "the metric sender process exited (code %s); starting another, the spool keeps every metric meanwhile",
                self._sender.returncode,
            )
            self._sender = self._start_sender()
            self._sender_started = time.monotonic()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Queue a small file for upload; it is read now, so the caller may delete it as soon as this returns."""
        name, data = Path(local_path).name, Path(local_path).read_bytes()
        self.log_artifacts_from(lambda directory: (directory / name).write_bytes(data), artifact_path)

    def log_artifacts_from(self, write: Callable[[Path], object], artifact_path: str | None = None) -> None:
        """Queue artifacts that the artifact thread writes (``write(directory)``) and uploads under
        ``artifact_path``: neither building a file (a Parquet table, a PNG) nor uploading it costs a step."""
        self._artifacts.put((write, artifact_path))

    def close(self, timeout_s: float = 60.0) -> None:
        """Send what is queued, retrying for up to ``timeout_s``; report what could not be sent."""
        self._close_timeout_s = timeout_s
        self._stop.set()
        try:
            self._sender.stdin.write(f"{timeout_s}\n".encode())
            self._sender.stdin.close()  # the sender drains the spool and exits
        except OSError:
            pass  # the sender is gone already: what it left stays in the spool
        try:
            self._sender.wait(timeout_s + self._interval_s + 10)  # it warns itself of what it could not send
        except subprocess.TimeoutExpired:
            self._sender.kill()
            logger.warning(
                "the metric sender did not finish within %s s; unsent metrics stay in %s and are sent "
                "when the run is resumed",
                timeout_s,
                self._spool.path,
            )
        self._thread.join(timeout_s + self._interval_s + 5)
        self._log_unspooled_drops()
        self._spool.close()
        unsent_artifacts = len(self._pending_artifacts) + self._artifacts.qsize()
        if unsent_artifacts:
            logger.warning("MLflow logger closed with %d unsent artifact uploads", unsent_artifacts)

    def _log_unspooled_drops(self) -> None:
        """A spool that could not write until the end (a disk that stayed full) could not record how many metrics it
        dropped: send that count straight to MLflow, so the run shows its gap."""
        from orchestrator.metric_spool import DROPPED_METRICS

        drops = self._spool.unlogged_drops()
        if drops is None:
            return
        count, step = drops
        try:
            self._client.log_metric(self._run_id, DROPPED_METRICS, count, step=step)
        except Exception as error:
            logger.warning("could not log %s=%d to MLflow run %s: %s", DROPPED_METRICS, count, self._run_id, error)

    def _start_sender(self) -> subprocess.Popen:
        """The sender process, with this interpreter, the package's import path and this environment; credentials
        of the URI go in its environment, never on its command line (which ``ps`` shows to every user)."""
        import orchestrator

        package_root = str(Path(orchestrator.__file__).resolve().parents[1])
        uri, carried = credentials.environment_for(self._uri)
        environment = {
            **os.environ,
            **carried,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.metric_sender",
                uri,
                self._run_id,
                str(self._spool.path),
                "--interval",
                str(self._interval_s),
            ],
            stdin=subprocess.PIPE,
            env=environment,
        )

    def _send_artifacts_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._send_artifacts()
        deadline = time.monotonic() + self._close_timeout_s
        while not self._send_artifacts() and time.monotonic() < deadline:
            time.sleep(self._interval_s)

    def _send_artifacts(self) -> bool:
        """Write and upload every queued artifact; a writer that fails is dropped, an upload that fails is kept."""
        while not self._artifacts.empty():
            self._pending_artifacts.append(self._artifacts.get_nowait())
        while self._pending_artifacts:
            write, artifact_path = self._pending_artifacts[0]
            with tempfile.TemporaryDirectory(prefix="xcm-artifact-") as directory:
                try:
                    write(Path(directory))
                except Exception:
                    logger.exception("could not write artifacts for %s; dropped", artifact_path)
                    self._pending_artifacts.pop(0)
                    continue
                try:
                    self._client.log_artifacts(self._run_id, directory, artifact_path)
                except Exception as error:
                    logger.warning("MLflow artifact upload to %s failed (%s); kept for retry", artifact_path, error)
                    return False
            self._pending_artifacts.pop(0)
        return True

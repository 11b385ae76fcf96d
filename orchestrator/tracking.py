"""MLflow tracking: the driver opens and closes the run; rank 0 logs into it, batched and off the step path.

Shaped after Composer's MLflowLogger: one run per job, created by the driver so a failure anywhere can still
mark it FAILED; rank 0 spools metrics to local disk and a sender process (``metric_sender``) sends them with
``log_batch`` (every call is an HTTP round trip, so per-metric calls from the loop would dominate a tiny model's
step).

Experiments xcm creates are of MLflow 3's "custom model development" kind, which the UI opens in its model-training
view (its GenAI view is the default for experiments without a kind), and the links xcm prints ask for that view
too (the UI's switch between the views is per browser, not per experiment). A run is named
``<job>-<UTC date and time>-<run id[:8]>`` (names sort by start; the id's prefix is also its checkpoint
directory's) and carries a description and its dataset as an MLflow input.

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

    from orchestrator.spec import JobSpec, TrackingSpec

logger = logging.getLogger(__name__)

# MLflow retries a dead server for ~4 minutes by default; xcm would rather report it at once.
_CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 reports usage to its makers' servers unless told not to
    # xcm prints the run's link itself (in the training view); MLflow's own would follow it on ending a server's run
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
# Why a run ended FAILED (or KILLED) before or while training: the error, set by fail_run.
FAILURE_TAG = "xcm.failure"
_MAX_TAG_CHARACTERS = 5000  # the smallest limit of MLflow's stores
# A metric sender that died is restarted by the next log call, at most this often (the spool holds the metrics).
_SENDER_RESTART_S = 30.0
# How long closing the logger waits for the system-metrics thread's last batch (a store that is down retries).
_SYSTEM_METRICS_FINISH_S = 5.0
# MLflow 3 records an experiment's kind in this tag; the UI opens "custom_model_development" ones in its
# model-training view. Experiments a user gave another kind keep it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# The UI's view switch, as a link's query: without it a browser that never chose shows the GenAI view.
TRAINING_VIEW_QUERY = "?workflowType=machine_learning"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description, shown at the top of its page


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


def start_run(tracking: TrackingSpec, job_name: str, params: dict[str, str], job: JobSpec | None = None) -> str:
    """Create the job's MLflow run (and its experiment when new), log the resolved spec, return the run id.
    ``job`` (absent for an experiment's parent run) gives the run its description and dataset input."""
    prepare_local_store(tracking.uri)
    mlflow = client(tracking.uri)
    try:
        experiment_id = training_experiment(mlflow, tracking)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run = mlflow.create_run(experiment_id, run_name=f"{job_name}-{stamp}", tags={"xcm.job": job_name})
        mlflow.update_run(run.info.run_id, name=sortable_run_name(job_name, stamp, run.info.run_id))
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
        if job is not None:
            describe_run(mlflow, run.info.run_id, job)
    except Exception as error:  # the run exists now: it must not stay RUNNING
        fail_run(tracking.uri, run.info.run_id, f"params not logged: {type(error).__name__}: {error}")
        raise TrackingUnavailable(
            f"MLflow run {run.info.run_id} in {tracking.uri} refused the job's params "
            f"({type(error).__name__}: {error}); the run is marked FAILED"
        ) from error
    return run.info.run_id


def sortable_run_name(job_name: str, stamp: str, run_id: str) -> str:
    """``<job>-<YYYYMMDD-HHMMSS, UTC>-<run id[:8]>``: a job's runs sort by start, and the suffix is the one its
    checkpoint directory ends with."""
    return f"{job_name}-{stamp}-{run_id[:8]}"


def training_experiment(mlflow: MlflowClient, tracking: TrackingSpec) -> str:
    """The id of the job's experiment, created of the model-training kind when missing; an experiment without
    a kind (made before, or by hand) gets it, one with a kind keeps its own."""
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return mlflow.create_experiment(
            tracking.experiment,
            artifact_location=tracking.artifact_location,
            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND},
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return experiment.experiment_id


def describe_run(mlflow: MlflowClient, run_id: str, job: JobSpec) -> None:
    """The run's description (what trains, how) and its training data as an MLflow dataset input."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow.set_tag(run_id, DESCRIPTION_TAG, run_description(job))
    dataset = training_dataset(job)._to_mlflow_entity()
    mlflow.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def run_description(job: JobSpec) -> str:
    """One paragraph: the job, its model, data, objective and parallelism, as the run's page shows it."""
    model, training = job.model, job.training
    init = f"from {model.pretrained}" if model.init == "pretrained" else "random init"
    regulariser = (
        f"clusterability loss lambda {job.modularity.lambda_:g}, k {job.modularity.k}"
        if job.modularity.lambda_ > 0
        else "control run (lambda 0: clusterability measured, not trained for)"
    )
    return (
        f"xcm job **{job.name}**: {model.family} {model.size} ({init}) on {dataset_name(job)}; "
        f"{training.steps} steps, {regulariser}; DeepSpeed ZeRO stage {job.deepspeed.zero_stage}, "
        f"{job.resources.max_workers} workers, {training.precision}."
    )


def dataset_name(job: JobSpec) -> str:
    data = job.data
    if data.source == "hub" or (data.source in ("mnist", "cifar10") and data.dataset):
        return data.dataset if not data.dataset_config else f"{data.dataset}/{data.dataset_config}"
    if data.source == "files":
        return "files " + ", ".join(Path(path).name for path in data.files)[:200]
    if data.source == "modular_addition":
        return f"modular addition mod {data.modulus}"
    return data.source if data.source != "synthetic" else "xcm's synthetic corpus"


def training_dataset(job: JobSpec):
    """The job's training data as MLflow describes a dataset: a Hugging Face one by its name, config and split;
    any other by the data section's keys (xcm builds it, from files or generated)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    data = job.data
    if data.source == "hub":
        source = HuggingFaceDatasetSource(path=data.dataset, config_name=data.dataset_config, split=data.split)
    else:
        described = data.model_dump(mode="json", exclude={"cache_dir"})
        source = CodeDatasetSource(tags={key: str(value)[:500] for key, value in described.items()})
    return MetaDataset(source, name=dataset_name(job)[:500])


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
    """The run's page in the UI's model-training view."""
    uri = credentials.strip(uri)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW_QUERY}"


def start_system_metrics(uri: str, run_id: str, every_s: float):
    """MLflow's own system-metrics monitor (``system/cpu_utilization_percentage``, memory, disk, network, and per
    GPU utilisation and memory where NVML answers), sampling this node every ``every_s`` seconds on a daemon
    thread that logs each sample as one batch; continues the step count of a resumed run. None when off or when
    it cannot start (training goes on without it)."""
    if every_s <= 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=every_s, samples_before_logging=1, resume_logging=True, tracking_uri=uri
        )
        monitor.start()
    except Exception as error:  # psutil missing, a store that refuses: the run's own metrics matter more
        logger.warning("system metrics are not logged for MLflow run %s: %s", run_id, error)
        return None
    return monitor


class MetricLogger:
    """Rank 0's logger: ``log`` writes to the on-disk spool, which a sender process
    (``orchestrator.metric_sender``) moves into MLflow every ``interval_s``; ``log_artifact*`` enqueue for a
    daemon thread here, which writes and uploads them (rare, and their writers are closures).

    A failed send leaves the metrics in the spool (or the artifact in its queue) for the next round, so a
    tracking server that is down for a while loses nothing, and neither does a worker that dies: its sender
    drains the spool when the pipe from the trainer closes, and the next logger on the same spool sends what is
    left. ``close`` drains both before the run is marked finished.
    """

    def __init__(
        self, uri: str, run_id: str, spool_path: Path, interval_s: float = 1.0, system_metrics_every_s: float = 0
    ):
        from orchestrator.metric_spool import MetricSpool

        self._system_metrics = start_system_metrics(uri, run_id, system_metrics_every_s)
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

    def continue_run(self, unsent_metrics: Path | None) -> None:
        """A resumed run: spool the metrics its checkpoint kept unsent (``unsent_metrics``, when it kept any).
        A spool that remembers nothing of the run (a node that never ran it) first takes the steps MLflow holds
        as logged, so the steps recomputed after the checkpoint are logged once; without an answer from MLflow
        they may be logged twice, never lost."""
        if not self._spool.last_steps:
            try:
                latest = self._client.get_run(self._run_id).data.to_proto().metrics  # each metric's latest step
                self._spool.remember_logged({metric.key: metric.step for metric in latest})
            except Exception as error:
                logger.warning(
                    "could not read which steps MLflow holds (%s): recomputed steps may be logged twice", error
                )
        if unsent_metrics is not None:
            self._spool.import_unsent(unsent_metrics)

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
        if self._system_metrics is not None:  # its last samples, unless the store keeps them waiting
            finishing = threading.Thread(target=self._system_metrics.finish, name="xcm-system-metrics", daemon=True)
            finishing.start()
            finishing.join(_SYSTEM_METRICS_FINISH_S)
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

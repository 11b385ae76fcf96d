"""The driver side of a run: Ray, the MLflow run, Ray Train's TorchTrainer, and the summary at the end."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator import tracking
from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

# Reaches every Ray process of the job: DeepSpeed must see its accelerator before import, and Ray Train's
# controller polls workers at this interval (each report waits for a poll; the 2 s default makes reports slow).
_WORKER_ENVIRONMENT = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    checkpoint_path: str | None
    metrics: dict


def run_job(spec: JobSpec, workdir: Path | None = None) -> RunResult:
    """Train the job on Ray (local, or the cluster at RAY_ADDRESS) and track it in one MLflow run.

    The run is created before any worker starts, so whatever fails later is recorded as FAILED against it.
    """
    spec = spec.resolved(workdir or Path.cwd())
    run_id = tracking.start_run(spec.tracking, spec.name, spec.flat_params())
    status = "FAILED"
    try:
        result = _fit(spec, run_id)
        status = "FINISHED"
    finally:
        tracking.end_run(spec.tracking.uri, run_id, status)
    experiment_id = tracking.client(spec.tracking.uri).get_run(run_id).info.experiment_id
    return RunResult(run_id=run_id, experiment_id=experiment_id, tracking_uri=spec.tracking.uri,
                     checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                     metrics=dict(result.metrics or {}))


def _fit(spec: JobSpec, run_id: str):
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train.progress import ProgressBoard, ProgressLine
    from orchestrator.train.worker import train_worker

    _ensure_ray(spec)
    resources = spec.resources
    board_name = f"xcm-progress-{uuid.uuid4().hex[:12]}"
    board = ProgressBoard.options(name=board_name).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json", by_alias=True), "run_id": run_id,
                           "progress_actor": board_name},
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker,
                                  **({"GPU": resources.gpus_per_worker} if resources.use_gpu else {})}),
        run_config=RunConfig(
            name=f"{spec.name}-{run_id[:8]}", storage_path=spec.checkpointing.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpointing.keep_last)),
    )
    try:
        with ProgressLine(board, spec.training.steps):
            return trainer.fit()
    finally:
        ray.kill(board)


def _ensure_ray(spec: JobSpec) -> None:
    """Join the cluster at RAY_ADDRESS when set, else start a local Ray sized to the job."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {**_WORKER_ENVIRONMENT,
                                "DS_ACCELERATOR": "cuda" if spec.resources.use_gpu else "cpu"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
        return
    resources = spec.resources
    # address="local": a new instance even when a `ray start` cluster runs here (plain init would join it).
    ray.init(address="local",
             num_cpus=max(os.cpu_count() or 1, int(resources.num_workers * resources.cpus_per_worker)),
             include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)

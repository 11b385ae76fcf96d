"""``xcm resume``: continue a run from its newest intact checkpoint, in the same MLflow run.

The checkpoint carries the resolved job spec and the MLflow run id, so a run directory (or a checkpoint, or
the run id) is all a user gives. The driver reattaches the MLflow run (RUNNING again) and starts Ray Train
under the run's own name and storage path, so Ray restores its checkpoint list too; the workers load the
newest intact checkpoint and continue at its step, data position and partition. Steps that the interrupted
run had logged after that checkpoint are recomputed but not logged twice (``metric_spool``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator.spec import JobSpec, load_spec
from orchestrator.train import checkpoint_store as store


class ResumeError(RuntimeError):
    """Nothing to resume from, or nothing left to do: the message says what to pass instead."""


def locate(target: str, tracking_uri: str) -> store.Located:
    """The newest intact checkpoint of ``target``: a checkpoint, a run directory, or an MLflow run id."""
    if "://" in target or os.path.exists(target):
        filesystem, path = store.resolve(target)
    else:
        filesystem, path = store.resolve(_run_directory_of(target, tracking_uri))
    located = store.newest_intact(filesystem, path)
    if located is None:
        raise ResumeError(f"no intact checkpoint in {path} (see the warnings above). Pass a run directory "
                          "(xcm-runs/checkpoints/<job>-<run id>), one of its step-* checkpoints, or an MLflow "
                          "run id whose run wrote a checkpoint (checkpointing.every_steps sets how often).")
    return located


def resume_spec(located: store.Located, overrides: list[str] = ()) -> JobSpec:
    """The job the checkpoint was written by, with ``overrides`` (e.g. ``training.steps=200`` to train on),
    checked like any job file, and tied to the checkpoint's MLflow run."""
    if isinstance(located.filesystem, pafs.LocalFileSystem):
        spec = load_spec(Path(located.path) / store.JOB, list(overrides))
    else:
        with tempfile.TemporaryDirectory(prefix="xcm-resume-") as directory:
            job = Path(directory) / "job.yaml"
            job.write_text(store.read_text(located, store.JOB))
            spec = load_spec(job, list(overrides))
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"run_id": located.state.run_id})})


def resume_job(target: str, workdir: Path, overrides: list[str] = (), tracking_uri: str | None = None):
    """Continue ``target``'s run where its newest intact checkpoint left it; the run's ``RunResult``."""
    from orchestrator.train.checkpointing import check_resumable
    from orchestrator.train.launch import run_job

    located = locate(target, tracking_uri or JobSpec().resolved(workdir).tracking.uri)
    spec = resume_spec(located, overrides)
    if located.state.step >= spec.training.steps:
        raise ResumeError(f"run {located.state.run_id} already trained all {spec.training.steps} steps "
                          f"(checkpoint {located.uri}); to train on, pass --set training.steps=N with N > "
                          f"{located.state.step}")
    check_resumable(located.state, spec.resources.num_workers, located.uri)
    return run_job(spec, workdir, resume_from=located.uri)


def _run_directory_of(run_id: str, tracking_uri: str) -> str:
    """The run directory of an MLflow run, from the spec it logged (its resolved storage path and job name)."""
    from orchestrator import tracking

    try:
        params = tracking.client(tracking_uri).get_run(run_id).data.params
        spec = JobSpec.model_validate({"name": params["name"],
                                       "checkpointing": {"storage_path": params["checkpointing.storage_path"]}})
    except Exception as error:  # no such path, no such run, or a run that xcm did not start
        raise ResumeError(f"{run_id!r} is neither a path nor an xcm run in the MLflow store {tracking_uri} "
                          f"({type(error).__name__}: {error}); pass the run directory, or --tracking-uri for "
                          "the store the run is in") from error
    return store.run_directory(spec, run_id)

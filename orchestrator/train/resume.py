"""``xcm resume``: continue a run from a checkpoint, in the same MLflow run.

The checkpoint carries the resolved job spec and the MLflow run id, so a run directory (or a checkpoint, or
the run id) is all a user gives: a ``step-N`` checkpoint is resumed from exactly (to roll back past a
divergence), a run directory or run id from its newest intact checkpoint. Checkpoints after the one resumed
from are moved aside (``checkpoint_store.set_aside_newer``); those that did not verify are deleted once the run
has an intact checkpoint as new. The driver reattaches the MLflow run (RUNNING
again) and starts Ray Train under the run's own name and storage path; the workers load that checkpoint and
continue at its step, data position and partition. Steps that the interrupted run had logged after that
checkpoint are recomputed but not logged twice (``metric_spool``). After a rollback past intact checkpoints those
steps are the abandoned branch's, which MLflow cannot replace: the run's ``ROLLBACK_TAG`` names their range.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from orchestrator.spec import JobSpec
from orchestrator.train import checkpoint_store as store
from orchestrator.train.job_checks import load_spec

logger = logging.getLogger(__name__)

# Each rollback of the run: the steps whose metrics in MLflow are the abandoned branch's, and where its checkpoints are.
ROLLBACK_TAG = "xcm.rolled_back"
_MAX_TAG_CHARACTERS = 5000  # the smallest limit of MLflow's stores


class ResumeError(RuntimeError):
    """Nothing to resume from, or nothing left to do: the message says what to pass instead."""


def locate(target: str, tracking_uri: str) -> store.Located:
    """The checkpoint ``target`` names: a ``step-N`` checkpoint exactly, else the newest intact checkpoint of
    a run directory or an MLflow run id. ResumeError, naming each checkpoint's problem, when there is none."""
    if "://" in target or os.path.exists(target):
        place = store.resolve(target)
    else:
        place = store.resolve(_run_directory_of(target, tracking_uri))
    try:
        if store.is_checkpoint_path(place.path):
            return store.verified(*place)
        located, skipped = store.search(*place)
    except store.CheckpointKeyError as error:
        raise ResumeError(str(error)) from None
    except store.NotIntact as error:
        raise ResumeError(
            f"checkpoint {error.path} cannot be used: {error.reason}. Name another step-* "
            "checkpoint, or the run directory for its newest intact one"
        ) from None
    if located is None:
        raise ResumeError(_nothing_to_resume(place.path, skipped))
    return located


def _nothing_to_resume(path: str, skipped: list[store.NotIntact]) -> str:
    if not skipped:
        return (
            f"no checkpoint in {path}. Pass a run directory (xcm-runs/checkpoints/<job>-<run id>), one of its "
            "step-* checkpoints, or an MLflow run id whose run wrote a checkpoint (checkpointing.every_steps "
            "sets how often)."
        )
    reasons = "; ".join(f"{PurePosixPath(error.path).name}: {error.reason}" for error in skipped[:3])
    return (
        f"no intact, authentic checkpoint in {path} ({reasons}). Checkpoints are signed with the key in "
        f"{store.KEY_ENV} (else {store.key_file()}): use the key the run was trained with."
    )


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


def resume_job(target: str, workdir: Path, overrides: list[str] = (), tracking_uri: str | None = None, console=None):
    """Continue ``target``'s run where the checkpoint ``locate`` finds left it; the run's ``RunResult``. The
    run's lines go to ``console`` (``orchestrator.console``; stdout when None)."""
    from orchestrator.train.launch import run_job

    located = locate(target, tracking_uri or JobSpec().resolved(workdir).tracking.uri)
    spec = resume_spec(located, overrides)
    if located.state.step >= spec.training.steps:
        raise ResumeError(
            f"run {located.state.run_id} already trained all {spec.training.steps} steps "
            f"(checkpoint {located.uri}); to train on, pass --set training.steps=N with N > "
            f"{located.state.step}"
        )
    # An elastic group restores at whatever size Ray gives it, converting in the worker (checkpointing.restore).
    resized = not spec.resources.elastic and located.state.world_size != spec.resources.num_workers
    if resized:
        spec = keep_global_batch(spec, resume_spec(located), located)
    aside = store.set_aside_newer(located)
    if aside.superseded is not None:
        logger.warning(
            "resuming %s from step %d: its later checkpoints are moved to %s",
            located.state.run_id,
            located.state.step,
            aside.superseded,
        )
        mark_rollback(spec.resolved(workdir).tracking.uri, located.state.run_id, located.state.step, aside.superseded)
    if aside.refused is not None:
        logger.warning(
            "resuming %s from step %d: its later checkpoints that do not verify are moved to %s, deleted once the "
            "run has an intact checkpoint as new",
            located.state.run_id,
            located.state.step,
            aside.refused,
        )
    run_directory = str(PurePosixPath(located.path).parent)
    if resized:
        from orchestrator.train.universal import universal_checkpoint

        located = universal_checkpoint(located)
    try:
        return run_job(spec, workdir, resume_from=located.uri, console=console)
    finally:
        _discard_refused(located, run_directory)


def mark_rollback(uri: str, run_id: str, step: int, superseded: str) -> None:
    """Say in the run (``ROLLBACK_TAG``, appended to at each rollback) and here which steps' metrics in MLflow are
    the branch abandoned by a resume from step index ``step``: from it to the last step that branch logged.

    MLflow cannot delete a logged value, and the spool logs each step once (a second value per step would draw the
    two branches as one zigzag), so the resumed run logs from the step after; its own values of the steps before are
    not kept. A store that does not answer costs only the tag, with a warning."""
    from orchestrator import metric_names, tracking

    try:
        mlflow = tracking.client(uri)
        run = mlflow.get_run(run_id)
        logged = {metric.key: metric.step for metric in run.data.to_proto().metrics}.get(metric_names.LOSS, -1)
        if logged < step:
            return
        note = f"steps {step}-{logged}: the branch abandoned at the resume from step {step} (checkpoints {superseded})"
        earlier = run.data.tags.get(ROLLBACK_TAG)
        mlflow.set_tag(run_id, ROLLBACK_TAG, (f"{earlier}; {note}" if earlier else note)[-_MAX_TAG_CHARACTERS:])
    except Exception as error:  # any failure of the store: the resume goes on
        logger.warning("could not tag run %s with the rolled-back steps (%s: %s)", run_id, type(error).__name__, error)
        return
    logger.warning(
        "MLflow keeps the abandoned branch's metrics of steps %d-%d (it cannot replace logged values); the resumed run "
        "logs from step %d on (run tag %s)",
        step,
        logged,
        logged + 1,
        ROLLBACK_TAG,
    )


def _discard_refused(located: store.Located, run_directory: str) -> None:
    """The run's quarantined checkpoints that an intact one has caught up with, deleted (also after a failed
    launch, which may have saved some); a failure to delete leaves them for the next resume, with a warning."""
    try:
        deleted = store.discard_refused(located.filesystem, run_directory, located.query)
    except (OSError, store.CheckpointKeyError) as error:
        logger.warning("the refused checkpoints in %s stay for now: %s", run_directory, error)
        return
    for path in deleted:
        logger.info("deleted %s: the run has an intact checkpoint at least as new as each of its checkpoints", path)


def keep_global_batch(spec: JobSpec, written_by: JobSpec, located: store.Located) -> JobSpec:
    """``spec`` on its worker count with the global batch of the job that wrote the checkpoint: the gradient
    accumulation makes up for the worker count, so the optimizer steps, the LR schedule and the data position
    mean what they meant. ResumeError, naming the worker counts that work, when none can."""
    state, old, new = located.state, written_by.training, spec.training
    global_batch = old.micro_batch_size * old.gradient_accumulation_steps * state.world_size
    workers = spec.resources.num_workers
    if state.zero_stage == 0:
        raise ResumeError(
            f"checkpoint {located.uri} was written by {state.world_size} workers without ZeRO; a resume on another "
            f"worker count needs ZeRO 1-3: resume with --set resources.num_workers={state.world_size}"
        )
    accumulation, remainder = divmod(global_batch, new.micro_batch_size * workers)
    if remainder or accumulation < 1:
        fitting = [n for n in range(1, global_batch + 1) if global_batch % (new.micro_batch_size * n) == 0]
        raise ResumeError(
            f"{workers} workers of micro_batch_size {new.micro_batch_size} cannot keep the run's global batch of "
            f"{global_batch} ({old.micro_batch_size} x {old.gradient_accumulation_steps} accumulated x "
            f"{state.world_size} workers): use --set resources.num_workers=N with N in {fitting}"
        )
    if accumulation != new.gradient_accumulation_steps:
        logger.warning(
            "resuming on %d workers instead of %d: gradient accumulation %d keeps the global batch of %d",
            workers,
            state.world_size,
            accumulation,
            global_batch,
        )
    return spec.model_copy(update={"training": new.model_copy(update={"gradient_accumulation_steps": accumulation})})


def _run_directory_of(run_id: str, tracking_uri: str) -> str:
    """The run directory of an MLflow run, from the spec it logged (its resolved storage path and job name)."""
    from orchestrator import tracking

    try:
        params = tracking.client(tracking_uri).get_run(run_id).data.params
        spec = JobSpec.model_validate(
            {"name": params["name"], "checkpointing": {"storage_path": params["checkpointing.storage_path"]}}
        )
    except Exception as error:  # no such path, no such run, or a run that xcm did not start
        raise ResumeError(
            f"{run_id!r} is neither a path nor an xcm run in the MLflow store {tracking_uri} "
            f"({type(error).__name__}: {error}); pass the run directory, or --tracking-uri for "
            "the store the run is in"
        ) from error
    return store.run_directory(spec, run_id)

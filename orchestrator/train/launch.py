"""The driver side of a run: Ray, the MLflow run, Ray Train's TorchTrainer, and the summary at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator import credentials, priority, tracking
from orchestrator.console import Console
from orchestrator.spec import JobSpec, SpecError

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


def run_job(
    spec: JobSpec, workdir: Path | None = None, resume_from: str | None = None, console: Console | None = None
) -> RunResult:
    """Train the job on Ray (local, or the cluster at RAY_ADDRESS) and track it in one MLflow run; what runs
    where, the progress and the notes of the run go to ``console`` (stdout when None).

    The run is created (or, for ``xcm submit``'s and ``xcm resume``'s, attached) before anything else can fail,
    so whatever fails later ends it FAILED with the reason as its ``xcm.failure`` tag; a run never stays RUNNING.
    ``resume_from`` (a checkpoint, from ``xcm resume``) is exactly where the workers start; after a worker-group
    restart they continue from this launch's newest checkpoint instead. Stopped (Ctrl-C, SIGTERM), it says how
    to resume the run before the interruption goes on up.
    """
    from orchestrator.data.preflight import check_data
    from orchestrator.train.checkpoint_store import checkpoint_key, key_id
    from orchestrator.train.model_logging import log_trained_model

    console = console or Console(sys.stdout)

    # Made here when missing (a local run's workers share this machine's key file); a key that cannot be used
    # stops the run before it exists, not at its first checkpoint.
    checkpoint_key_id = key_id(checkpoint_key(create=True))
    # Credentials in the job's URIs move into this process's environment, which the Ray started here and the
    # metric sender inherit; from here on no URI carries them (``orchestrator.credentials``).
    spec, _ = credentials.take_from_spec(spec)
    spec = spec.resolved(workdir or Path.cwd())
    uri, existing_run = spec.tracking.uri, spec.tracking.run_id
    if not existing_run:
        # Bad data input (missing files, an unreachable dataset, a tokenizer too big for the model) stops a new run
        # here, before it exists; a text source's tokens are cached now, and the workers read the cache.
        check_data(spec)
    run_id = (
        tracking.attach_run(uri, existing_run)
        if existing_run
        else tracking.start_run(spec.tracking, spec.name, spec.flat_params(), job=spec)
    )
    with resume_hint(console, spec, run_id), ending_run(uri, run_id):
        experiment_id = tracking.client(uri).get_run(run_id).info.experiment_id
        announce_run(console, spec, run_id, experiment_id)
        if existing_run:
            check_data(spec)  # on the cluster, for a submitted run: its files and caches are the cluster's
        tracking.log_resolved_spec(uri, run_id, spec.to_yaml())
        result = _fit(spec, run_id, checkpoint_key_id, console, resume_from)
        log_trained_model(spec, run_id, console.say)
    return RunResult(
        run_id=run_id,
        experiment_id=experiment_id,
        tracking_uri=uri,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
    )


@contextlib.contextmanager
def ending_run(uri: str, run_id: str):
    """End the MLflow run when the block ends: FINISHED; KILLED on Ctrl-C or SIGTERM from `xcm stop` / `ray job
    stop` (Ray's driver handler turns it into SystemExit): a deliberate stop, whose last checkpoint stays for
    `xcm resume`; FAILED on any error, with the error as the run's ``xcm.failure`` tag."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        tracking.end_run(uri, run_id, "KILLED")
        raise
    except BaseException as error:
        tracking.fail_run(uri, run_id, failure_reason(error))
        raise
    tracking.end_run(uri, run_id, "FINISHED")


def announce_run(console: Console, spec: JobSpec, run_id: str, experiment_id: str) -> None:
    """Where the run is tracked and where its log is, first thing: a run stopped early is still found."""
    from orchestrator.train.checkpoint_store import run_directory, run_directory_name

    uri = spec.tracking.uri
    console.say(f"xcm: MLflow run {run_id}: {tracking.run_link(uri, experiment_id, run_id)}")
    console.say(f"  open the MLflow UI:  {tracking.ui_command(uri)}")
    if console.log_path is not None:
        location = run_directory(spec, run_id)
        local = "://" not in location
        console.keep_log_in(
            Path(location) if local else console.log_path.parent / run_directory_name(spec.name, run_id)
        )
        console.say(f"  log of Ray, DeepSpeed and the workers: {shown(console.log_path)} (--verbose shows it here)")


class RunFailed(RuntimeError):
    """A run that ended FAILED after it was created, once the terminal has said why and how to resume it; the
    error itself is its ``__cause__``."""


@contextlib.contextmanager
def resume_hint(console: Console, spec: JobSpec, run_id: str):
    """A run that stops says how to go on with it, after ``ending_run`` has marked it: stopped on purpose (Ctrl-C;
    SIGTERM from `xcm stop` or `ray job stop`), KILLED; failed, FAILED with its cause in one line, the whole error
    going where the rest of the output goes (the run's log file unless --verbose) and on as ``RunFailed``."""
    from orchestrator.train.checkpoint_store import run_directory

    location = run_directory(spec, run_id)
    resume_line = f"  resume it:  xcm resume {shown(location) if '://' not in location else location}"
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        console.end_live()
        console.say(f"xcm: stopped; MLflow run {run_id} is KILLED{newest_checkpoint_note(location)}")
        console.say(resume_line)
        raise
    except (tracking.TrackingUnavailable, SpecError):  # bad input: the command says it in one line of its own
        raise
    except Exception as error:
        console.end_live()
        traceback.print_exception(error, file=sys.stderr)
        summary = credentials.redact(failure_summary(error))  # an error can quote a URI
        console.say(f"xcm: MLflow run {run_id} FAILED{newest_checkpoint_note(location)}")
        console.say(f"  cause: {summary}")
        console.say(f"  the whole error: the run's xcm.failure tag and {_error_shown_in(console)}")
        console.say(resume_line)
        raise RunFailed(summary) from error


def failure_summary(error: BaseException) -> str:
    """The error in one line: for Ray Train's, the lowest failing rank's own error (its message carries every
    rank's traceback); of a traceback, its last line, which names the exception."""
    prefix, cause = "", error
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank, cause = min(failures.items())
        cause, prefix = getattr(cause, "cause", None) or cause, f"rank {rank}: "
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if not lines:
        return f"{prefix}{type(cause).__name__}"
    line = lines[-1] if any(line.startswith("Traceback (most recent call last)") for line in lines) else lines[0]
    return prefix + (line if line.startswith(type(cause).__name__) else f"{type(cause).__name__}: {line}")


def _error_shown_in(console: Console) -> str:
    return shown(console.log_path) if console.log_path is not None else "the output above"


def newest_checkpoint_note(run_directory: str) -> str:
    """What the stop line adds about a local run directory's newest checkpoint (names listed, nothing verified)."""
    if "://" in run_directory:
        return ""
    from orchestrator.train.checkpoint_store import CHECKPOINT_PREFIX, name_order

    names = sorted(
        (path.name for path in Path(run_directory).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()), key=name_order
    )
    if not names:
        return "; no checkpoint was written: resuming starts it over"
    return f"; its newest checkpoint is {names[-1]}"


def shown(path: str | Path) -> str:
    """A path as the user types it: relative to the working directory when under it."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def failure_reason(error: BaseException) -> str:
    """What a FAILED run's tag says: the error's type and message (Ray Train's carries the worker's traceback)."""
    return f"{type(error).__name__}: {error}"


def fail_submitted_run(job_file: str, error: Exception) -> None:
    """A job file that names its MLflow run (``xcm submit`` writes one, creating the run RUNNING) but does not load
    on the cluster, whose files, caches and hardware differ from the submitter's: end that run FAILED with the
    problems, since no driver will attach it. Any other job file names no run, and nothing happens."""
    from pydantic import ValidationError

    from orchestrator.spec import SpecError, TrackingSpec, read_job

    try:
        raw, _ = read_job(Path(job_file))
        section = TrackingSpec.model_validate(raw.get("tracking") or {})
    except (SpecError, ValidationError, AttributeError):
        return
    if section.run_id and section.uri:
        tracking.fail_run(section.uri, section.run_id, failure_reason(error))


def _fit(spec: JobSpec, run_id: str, checkpoint_key_id: str, console: Console, resume_from: str | None = None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.console import ProgressDisplay
    from orchestrator.train.checkpoint_store import run_directory, run_directory_name
    from orchestrator.train.progress import ProgressBoard
    from orchestrator.train.side_job_registry import start_side_job_actors, stop_side_job_actors
    from orchestrator.train.stopping import StopOnInterrupt
    from orchestrator.train.worker import train_worker

    dashboard = ensure_ray(spec)
    announce_placement(console, spec, dashboard)
    board_name = f"xcm-progress-{uuid.uuid4().hex[:12]}"
    board = ProgressBoard.options(name=board_name).remote()
    side_job_actors = start_side_job_actors(spec)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json", by_alias=True),
            "run_id": run_id,
            "progress_actor": board_name,
            "side_job_actors": {name: list(actors) for name, actors in side_job_actors.items()},
            "resume_from": resume_from,
            "checkpoint_key_id": checkpoint_key_id,
            # names this launch in its checkpoints: a worker-group restart continues from this
            # launch's own, not from a later branch of the run that `xcm resume` rolled back
            "session": uuid.uuid4().hex,
        },
        **worker_group(spec),
        # The same name on every start of the run: Ray Train then restores its checkpoints on `xcm resume`.
        run_config=RunConfig(
            name=run_directory_name(spec.name, run_id),
            storage_path=spec.checkpointing.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpointing.keep_last),
            failure_config=FailureConfig(max_failures=spec.checkpointing.max_failures),
        ),
    )
    try:
        with (
            ProgressDisplay(console, board, spec.training.steps) as display,
            StopOnInterrupt(console, display, spec, run_directory(spec, run_id)) as stopping,
        ):
            return fit_in_background(trainer, stopping)
    except KeyboardInterrupt:
        # The workers, their controller and the side jobs are this driver's actors: disconnecting ends them
        # (and a local Ray with them) now, while Ray's output still goes where the console sends it.
        disconnect_ray()
        raise
    finally:
        if ray.is_initialized():
            ray.kill(board)
            stop_side_job_actors(side_job_actors)


def fit_in_background(trainer, stopping):
    """``trainer.fit()`` on a thread, the main thread waiting for it: Ray Train installs its own Ctrl-C handler
    when fit runs on the main thread (abort at once, a third Ctrl-C exits), which would replace xcm's
    (``StopOnInterrupt``); on another thread it installs none, as under Ray Tune."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised on the main thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="xcm-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        stopping.check()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def announce_placement(console: Console, spec: JobSpec, dashboard: str | None) -> None:
    """What runs where: the Ray instance, the worker group and DeepSpeed's setup; and the first-use wait."""
    import ray

    resources, training = spec.resources, spec.training
    kind = "a local Ray" if not os.environ.get("RAY_ADDRESS") else "the Ray cluster"
    console.say(
        f"xcm: on {kind} at {ray.get_runtime_context().gcs_address}"
        + (f" (dashboard {dashboard if '://' in dashboard else 'http://' + dashboard})" if dashboard else "")
    )
    per_worker = f"{resources.gpus_per_worker:g} GPU" if resources.use_gpu else f"{resources.cpus_per_worker:g} CPU"
    workers = (
        f"{resources.min_workers}-{resources.max_workers} (elastic)" if resources.elastic else resources.num_workers
    )
    console.say(
        f"  {workers} workers × {per_worker} ({'nccl' if resources.use_gpu else 'gloo'}), "
        f"DeepSpeed ZeRO-{spec.deepspeed.zero_stage}, {training.precision}, {training.steps} steps"
    )
    if not resources.use_gpu and not os.environ.get("RAY_ADDRESS") and not cpu_comm_op_built():
        console.say("xcm: compiling DeepSpeed's CPU communication op (once per machine, ~1-2 minutes)…")


def cpu_comm_op_built() -> bool:
    """Whether DeepSpeed's CPU communication op (``deepspeed_shm_comm``) is built for this Python in this
    machine's torch extensions directory, where the local workers (this process's environment) load it."""
    from torch.utils.cpp_extension import get_default_build_root

    version = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    return (Path(get_default_build_root()) / version / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()


def disconnect_ray() -> None:
    """Leave Ray (a local instance stops with it) when this process has joined it: what Ray still forwards from
    the workers is written before this returns."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def worker_group(spec: JobSpec) -> dict:
    """``TorchTrainer``'s ``torch_config`` and ``scaling_config`` for the job's workers (``bench/throughput.py``
    starts its plain DeepSpeed loop on Ray Train with the same ones)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    resources = spec.resources
    return {
        "torch_config": TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        "scaling_config": ScalingConfig(
            num_workers=resources.num_workers,  # a (min, max) tuple makes Ray Train v2's group elastic
            elastic_resize_monitor_interval_s=resources.grow_check_every_s,
            use_gpu=resources.use_gpu,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                **({"GPU": resources.gpus_per_worker} if resources.use_gpu else {}),
            },
        ),
    }


def ensure_ray(spec: JobSpec) -> str | None:
    """Join the cluster at RAY_ADDRESS when set, else start a local Ray sized to the job; its dashboard's URL
    when this call connected and the dashboard runs.

    A local instance's own processes are told its address (RAY_ADDRESS, on a GCS port chosen here). Without it,
    Ray's state API inside them (Ray Train's placement-group cleaner asks it whether the controller lives) takes
    the address `ray start` last wrote to /tmp/ray/ray_current_cluster: a cluster stopped without `ray stop`
    left there made the cleaner wait for a dead GCS and every run's shutdown 12 s longer; a `ray start` cluster
    still running here made it ask that cluster about this run's controller, find none, and take it for dead.
    Its workers run at the driver's priority, not below Ray's daemons (`orchestrator.priority`).

    A local instance's processes inherit this process's environment, so the workers' variables are set in it for
    the moment Ray starts, not given as a runtime_env: with one, Ray starts every worker and actor through an
    extra Python process (``setup_worker.py``, which imports Ray) that then execs the worker, and cannot hand them
    the workers it started in advance; a run starts about ten actors on a machine of a few cores.
    """
    import ray

    if ray.is_initialized():
        return None
    runtime_env = {"env_vars": {**_WORKER_ENVIRONMENT, "DS_ACCELERATOR": "cuda" if spec.resources.use_gpu else "cpu"}}
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(runtime_env=runtime_env, log_to_driver=True)
        if spec.tracking.run_id is None:  # a submitted job's run was checked where it was submitted
            refuse_paths_a_remote_cluster_cannot_see(spec)
        return context.dashboard_url or None
    resources = spec.resources
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(free_port())  # read by the GCS that ray.init starts
    local_environment = {**runtime_env["env_vars"], "RAY_GCS_SERVER_PORT": port, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    # address="local": a new instance even when a `ray start` cluster runs here (plain init would join it, and it
    # ignores RAY_ADDRESS).
    with loopback_only_ray(), environment(local_environment):
        context = ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(resources.max_workers * resources.cpus_per_worker)),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            _system_config={"worker_niceness": priority.WORKER_NICENESS},
        )
    return context.dashboard_url or None


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """This process's environment with ``variables`` set while the block runs, as it was afterwards."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def refuse_paths_a_remote_cluster_cannot_see(spec: JobSpec) -> None:
    """`xcm run` with RAY_ADDRESS joins that cluster from here: when its nodes are other machines, this machine's
    store, checkpoint directory and data would be written and read on theirs (metrics and checkpoints lost), so
    the run is refused with each such key, as `xcm submit` refuses them (``cluster_locality``)."""
    from orchestrator.cluster_locality import (
        is_local_cluster,
        joined_cluster_nodes,
        this_machine,
        unreachable_path_problems,
    )

    if is_local_cluster(joined_cluster_nodes(), this_machine()):
        return
    if problems := unreachable_path_problems(spec, Path.cwd()):
        raise SpecError(
            f"the job for the cluster at RAY_ADDRESS={credentials.redact(os.environ['RAY_ADDRESS'])}", problems
        )


@contextlib.contextmanager
def loopback_only_ray():
    """Start Ray in its local-only mode (its default on macOS and Windows): the node's address is 127.0.0.1, so the
    GCS, raylet, object manager, dashboard and agents all listen on the loopback interface. Otherwise Ray takes
    this machine's network address and its GCS and raylet listen on every interface, open to anyone who can reach
    the machine. Ray reads the switch when it is imported (hence also the variable, for the processes it starts)
    and this process may have imported Ray already (hence its constant, restored afterwards)."""
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    previous = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(variable)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[variable] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[0]
        if previous[1] is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous[1]


def free_port() -> int:
    """A port nothing listens on now (the GCS binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]

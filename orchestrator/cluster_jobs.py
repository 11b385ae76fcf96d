"""Jobs on a Ray cluster through Ray's Jobs API: submit, status, logs, stop, list.

The same job file runs on a laptop and on a cluster: ``submit`` validates it here, resolves it (overrides,
tracking URI, storage path) into one YAML that travels in the job's runtime environment with xcm's code, and
creates the MLflow run here, so the link can be printed before the cluster starts working. The cluster is
asked whether it runs on this machine (``cluster_locality``); when it does not, the job's paths that only this
machine has are refused before anything is sent. Credentials in the job's URIs stay in this process's
environment (``credentials``): the job on the cluster reads them from its nodes' environment.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orchestrator
from orchestrator import credentials, tracking
from orchestrator.credentials import redact
from orchestrator.spec import JobSpec, SpecError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBMITTED_JOB_FILE = "job.yaml"
SUBMISSION_TAG = "xcm.submission"  # on the MLflow run: the Ray job that works on it now
# Ray's job supervisor SIGKILLs the entrypoint this long after SIGTERM; the driver needs a moment to mark
# the MLflow run KILLED and let Ray Train stop its workers.
_STOP_GRACE_SECONDS = "30"


class ClusterError(RuntimeError):
    """A cluster operation that cannot go ahead; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_id: str
    run_link: str
    address: str


def submit(job_file: str, overrides: list[str], address: str, workdir: Path) -> Submission:
    """Validate, resolve and submit a job; the MLflow run exists (RUNNING) when this returns."""
    from orchestrator.cluster_locality import unreachable_path_problems
    from orchestrator.train.job_checks import load_spec

    spec, moved = credentials.take_from_spec(load_spec(job_file, overrides))
    local = cluster_is_local(address)
    if not local and (problems := unreachable_path_problems(spec, workdir)):
        raise SpecError(job_file, problems)
    spec = _resolved_for_cluster(spec, workdir, local)
    _tell_where_credentials_come_from(moved)
    client = connect(address)
    run_id = tracking.start_run(spec.tracking, spec.name, spec.flat_params(), job=spec)
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"run_id": run_id})})
    job_id = f"xcm-{spec.name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="xcm-submit-") as staging:
        Path(staging, SUBMITTED_JOB_FILE).write_text(spec.to_yaml())
        try:
            return _submit_job(
                client,
                address,
                job_id,
                run_id,
                spec.tracking.uri,
                entrypoint=f"python -m orchestrator.cli run {SUBMITTED_JOB_FILE}",
                runtime_env=_runtime_env(staging),
                metadata={"xcm.job": spec.name},
            )
        except ClusterError as error:
            tracking.fail_run(spec.tracking.uri, run_id, str(error))
            raise


def submit_resume(target: str, overrides: list[str], tracking_uri: str | None, address: str) -> Submission:
    """Submit `xcm resume TARGET` as a job: the run continues on the cluster, in the same MLflow run.

    The newest intact checkpoint is located here first, so a typo or a run without checkpoints fails at once
    instead of in the job's logs; the cluster then finds the same checkpoint through the same store, and a remote
    one must be able to read everything the checkpoint's job names."""
    from orchestrator.cluster_locality import is_local_store, unreachable_path_problems
    from orchestrator.train.resume import ResumeError, locate, resume_spec

    target = credentials.take(target)
    uri = credentials.take(tracking_uri) or JobSpec().resolved(Path.cwd()).tracking.uri
    local = cluster_is_local(address)
    if not local and is_local_store(uri):
        raise ClusterError(
            f"the cluster at {redact(address)} cannot read the local MLflow store {uri}: pass "
            "--tracking-uri http://<host>:5000 (the server in infra/mlflow) that the run was logged to"
        )
    try:
        located = locate(target, uri)
        if not local and (problems := unreachable_path_problems(resume_spec(located, overrides), Path.cwd())):
            raise SpecError(f"checkpoint {located.uri}", problems)
    except ResumeError as error:
        raise ClusterError(str(error)) from None
    run_id = located.state.run_id
    client = connect(address)
    job_id = f"xcm-resume-{run_id[:8]}-{uuid.uuid4().hex[:8]}"
    return _submit_job(
        client,
        address,
        job_id,
        run_id,
        uri,
        entrypoint=resume_entrypoint(target, uri, overrides),
        runtime_env=_runtime_env(None),
        metadata={"xcm.resume": target},
    )


def resume_entrypoint(target: str, tracking_uri: str, overrides: list[str]) -> str:
    """The job's shell command for `xcm resume`: every argument quoted, so an override is one argument to xcm
    whatever it holds (spaces, quotes, a `;`), never shell syntax on the cluster."""
    arguments = [target, "--tracking-uri", tracking_uri, *(f"--set={override}" for override in overrides)]
    return shlex.join(["python", "-m", "orchestrator.cli", "resume", *arguments])


def _submit_job(
    client,
    address: str,
    job_id: str,
    run_id: str,
    tracking_uri: str,
    entrypoint: str,
    runtime_env: dict,
    metadata: dict,
) -> Submission:
    """Submit one xcm job for the MLflow run ``run_id``, tagged with the run so `xcm status` can name it, and the
    run with the job (SUBMISSION_TAG), so `xcm status` can end the run should the job die before its driver can."""
    try:
        tracking.client(tracking_uri).set_tag(run_id, SUBMISSION_TAG, job_id)
    except Exception as error:
        raise ClusterError(
            f"MLflow run {run_id} in {tracking_uri} cannot be tagged with its job ({error}); "
            "check that the tracking store is reachable from here"
        ) from error
    try:
        _submit_when_agent_ready(
            client,
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={**metadata, "xcm.run_id": run_id, "xcm.tracking_uri": tracking_uri},
        )
    except Exception as error:
        raise ClusterError(f"the cluster at {address} refused the job: {error}") from error
    experiment_id = tracking.client(tracking_uri).get_run(run_id).info.experiment_id
    return Submission(
        job_id=job_id, run_id=run_id, address=address, run_link=tracking.run_link(tracking_uri, experiment_id, run_id)
    )


def _runtime_env(working_dir: str | None) -> dict:
    """xcm's own code travels with every job; the job file, when there is one, in the working directory."""
    runtime_env = {
        "py_modules": [str(Path(orchestrator.__file__).parent)],
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": _STOP_GRACE_SECONDS},
    }
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    return runtime_env


def _submit_when_agent_ready(client, timeout_s: float = 60.0, **job) -> None:
    """A head that just started answers 500 "No available agent" until its job agent is up: wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def cluster_is_local(address: str) -> bool:
    """Whether every alive node of the cluster at ``address`` is this machine (``cluster_locality``); a cluster
    that cannot be asked is taken as remote, with a warning line."""
    from orchestrator.cluster_locality import alive_nodes, is_local_cluster, this_machine

    try:
        nodes = alive_nodes(connect(address))
        if not nodes:
            raise ClusterError("it lists no alive node")
    except Exception as error:
        print(
            f"xcm: warning: cannot ask the cluster at {redact(address)} which machines it runs on "
            f"({redact(str(error).splitlines()[0])}); taking it as remote, which cannot read this machine's files",
            file=sys.stderr,
        )
        return False
    return is_local_cluster(nodes, this_machine())


def _resolved_for_cluster(spec: JobSpec, workdir: Path, local: bool) -> JobSpec:
    """The spec resolved here; for a remote cluster the default token cache is left for the job to place where
    it runs (this machine's path would not exist there, and a cache need not be shared: a node without it
    tokenizes again)."""
    resolved = spec.resolved(workdir)
    if local:
        return resolved
    return resolved.model_copy(update={"data": resolved.data.model_copy(update={"cache_dir": spec.data.cache_dir})})


def _tell_where_credentials_come_from(moved: list[str]) -> None:
    """Credentials moved out of the job's URIs stay here: the job reads them from the cluster's environment."""
    if moved:
        print(
            f"xcm: the credentials in the job's URIs are not sent with it: the cluster's nodes must have "
            f"{', '.join(moved)} in their environment (infra/README.md)",
            file=sys.stderr,
        )


def connect(address: str):
    """A Jobs API client, with Ray's connection and token errors turned into one line each."""
    use_token_when_available()  # before Ray is imported: it reads the mode once
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:
        raise ClusterError(_explain(error, address)) from None


def use_token_when_available() -> None:
    """Ray 2.60 heads require a token, but its Jobs client sends one only when RAY_AUTH_MODE=token is set:
    turn that on when the user has a token (RAY_AUTH_TOKEN, or the file `ray start` writes) and chose no mode."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _explain(error: Exception, address: str) -> str:
    text, address = redact(f"{type(error).__name__}: {error}"), redact(address)
    if "uthenticat" in text or "token" in text.lower():
        return (
            f"the Ray cluster at {address} wants its authentication token (Ray 2.60 enables token auth by "
            "default): copy the head's ~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN) and set "
            "RAY_AUTH_MODE=token"
        )
    if "onnect" in text or "refused" in text or "resolve" in text.lower():
        return (
            f"no Ray dashboard answers at {address}: start a head with `ray start --head "
            "--dashboard-host 127.0.0.1`, or pass --address http://HEAD:8265 (or set RAY_ADDRESS)"
        )
    return f"the Ray cluster at {address} failed: {text.splitlines()[0]}"


def status(address: str, job_id: str) -> dict:
    """The job's Ray status and message, with its MLflow run id (ended, if the job died without ending it)."""
    info = _job_info(address, job_id)
    found = {
        "job_id": job_id,
        "status": str(info.status),
        "message": info.message or "",
        "run_id": (info.metadata or {}).get("xcm.run_id", ""),
        "tracking_uri": (info.metadata or {}).get("xcm.tracking_uri", ""),
    }
    end_run_of_ended_job(job_id, found["status"], found["message"], found["run_id"], found["tracking_uri"])
    return found


def end_run_of_ended_job(job_id: str, job_status: str, message: str, run_id: str, tracking_uri: str) -> None:
    """A job that ended without its driver ending its MLflow run (its runtime environment never set up, its
    driver killed, or stopped before it attached the run) left the run RUNNING: end it FAILED (KILLED when
    stopped) with the job's message as the failure tag. Only the run's latest job may (SUBMISSION_TAG): a
    resumed run's earlier jobs ended long ago."""
    if job_status not in ("FAILED", "STOPPED") or not run_id or not tracking_uri:
        return
    try:
        run = tracking.client(tracking_uri).get_run(run_id)
    except Exception:  # the store is not reachable from here: the run stays as it is
        return
    if run.info.status != "RUNNING" or run.data.tags.get(SUBMISSION_TAG) != job_id:
        return
    tracking.fail_run(
        tracking_uri,
        run_id,
        f"Ray job {job_id} ended {job_status} before its driver ended the run: {message or 'no message'}",
        status="KILLED" if job_status == "STOPPED" else "FAILED",
    )


def logs(address: str, job_id: str) -> str:
    _job_info(address, job_id)
    return connect(address).get_job_logs(job_id)


async def follow_logs(address: str, job_id: str):
    _job_info(address, job_id)
    async for lines in connect(address).tail_job_logs(job_id):
        yield lines


def stop(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to its driver, which marks the MLflow run KILLED); False if already over."""
    _job_info(address, job_id)
    return connect(address).stop_job(job_id)


def list_jobs(address: str) -> list[dict]:
    jobs = connect(address).list_jobs()
    return [
        {
            "job_id": job.submission_id or job.job_id,
            "status": str(job.status),
            "run_id": (job.metadata or {}).get("xcm.run_id", ""),
            "entrypoint": redact(job.entrypoint),
        }
        for job in sorted(jobs, key=lambda job: job.start_time or 0)
    ]


def _job_info(address: str, job_id: str):
    client = connect(address)
    try:
        return client.get_job_info(job_id)
    except Exception as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise ClusterError(f"no job {job_id!r} on the cluster at {address}: `xcm list` shows the jobs") from None
        raise ClusterError(_explain(error, address)) from None

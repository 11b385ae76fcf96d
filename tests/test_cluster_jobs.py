"""The parts of `xcm submit/resume/status` that need no cluster: what a job carries, its command line, the spec it
is sent with, how Ray's errors read, and when the Jobs client is told to send a token."""

import os
import shlex
from pathlib import Path

import pytest

import orchestrator
from orchestrator import cluster_jobs
from tests.helpers import free_port, tiny_spec


def test_every_job_carries_xcms_code_and_the_stop_grace_the_driver_needs(tmp_path):
    """py_modules is the orchestrator package itself (Ray uploads it to every node), the stop grace is set, and the
    working directory (the resolved job file) travels only when there is one."""
    with_job_file = cluster_jobs._runtime_env(str(tmp_path))
    package = Path(with_job_file["py_modules"][0])
    assert package == Path(orchestrator.__file__).parent and (package / "cli.py").is_file()
    assert with_job_file["env_vars"] == {"RAY_JOB_STOP_WAIT_TIME_S": cluster_jobs._STOP_GRACE_SECONDS}
    assert with_job_file["working_dir"] == str(tmp_path)
    assert "working_dir" not in cluster_jobs._runtime_env(None)


def test_resume_entrypoint_keeps_each_override_one_argument():
    """An override holding spaces, quotes and a `;` reaches `xcm resume` as one argument, not as shell syntax."""
    hostile = "name=a b'; touch /tmp/owned; echo \""
    entrypoint = cluster_jobs.resume_entrypoint(
        "run dir/step-00000010", "http://mlflow:5000", ["training.steps=30", hostile]
    )
    assert shlex.split(entrypoint) == [
        "python",
        "-m",
        "orchestrator.cli",
        "resume",
        "run dir/step-00000010",
        "--tracking-uri",
        "http://mlflow:5000",
        "--set=training.steps=30",
        f"--set={hostile}",
    ]


def test_a_local_cluster_gets_the_spec_resolved_here(tmp_path):
    """On this machine the job runs with every path resolved under the directory it was submitted from."""
    resolved = cluster_jobs._resolved_for_cluster(tiny_spec(), tmp_path, local=True)
    assert resolved == tiny_spec().resolved(tmp_path)
    assert Path(resolved.data.cache_dir).is_relative_to(tmp_path)


def test_a_remote_cluster_places_the_token_cache_itself(tmp_path):
    """A remote cluster is sent the spec resolved here except the default token cache, which this machine's path
    would not reach: the job places it where it runs."""
    spec = tiny_spec()
    resolved = cluster_jobs._resolved_for_cluster(spec, tmp_path, local=False)
    assert resolved.data.cache_dir == spec.data.cache_dir
    assert resolved.tracking == spec.resolved(tmp_path).tracking


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("Authentication required: no token"), "wants its authentication token"),
        (ConnectionError("Connection refused"), "no Ray dashboard answers at http://head:8265"),
        (ValueError("Failed to resolve 'head'"), "no Ray dashboard answers at http://head:8265"),
        (RuntimeError("500 Internal Server Error\nTraceback ..."), "failed: RuntimeError: 500 Internal Server Error"),
    ],
)
def test_ray_errors_read_as_one_line_with_the_fix(error, expected):
    """Token, connection and other errors of Ray's Jobs client become one line that says what to do."""
    explained = cluster_jobs._explain(error, "http://head:8265")
    assert expected in explained and "\n" not in explained


def test_an_address_with_credentials_is_never_shown():
    """The user:password of a dashboard address is masked in every line about it."""
    for error in (ConnectionError("Connection refused"), RuntimeError("boom")):
        assert "pa55word" not in cluster_jobs._explain(error, "http://user:pa55word@head:8265")


@pytest.mark.parametrize(
    ("environment", "token_file", "mode"),
    [
        ({"RAY_AUTH_TOKEN": "t"}, False, "token"),  # a token in the environment
        ({}, True, "token"),  # the file `ray start` writes
        ({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}, True, "disabled"),  # the user's choice stands
        ({}, False, None),  # no token at all: Ray's default
    ],
)
def test_the_jobs_client_sends_a_token_only_when_there_is_one(environment, token_file, mode, tmp_path, monkeypatch):
    """RAY_AUTH_MODE=token is set for Ray's client when the user has a token and chose no mode, never otherwise."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.setenv(name, "")  # recorded, so the mode this test sets is undone after it
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "auth_token"
    if token_file:
        path.write_text("t")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    cluster_jobs.use_token_when_available()
    assert os.environ.get("RAY_AUTH_MODE") == mode


class _HeadStartingUp:
    """A Jobs client whose head answers "No available agent" ``refusals`` times, as a fresh head does."""

    def __init__(self, refusals: int, error: str = "500: No available agent to submit job"):
        self.refusals, self.error, self.submitted = refusals, error, []

    def submit_job(self, **job):
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError(self.error)
        self.submitted.append(job)


def test_submission_waits_for_a_starting_heads_job_agent():
    """A head whose job agent is not up yet is asked again until it takes the job, once."""
    client = _HeadStartingUp(refusals=1)
    cluster_jobs._submit_when_agent_ready(client, timeout_s=30, entrypoint="true", submission_id="xcm-1")
    assert client.submitted == [{"entrypoint": "true", "submission_id": "xcm-1"}]


def test_other_submission_errors_are_not_retried():
    """Any other refusal is raised at once: retrying would only hide it."""
    client = _HeadStartingUp(refusals=1, error="400: runtime_env is invalid")
    with pytest.raises(RuntimeError, match="runtime_env is invalid"):
        cluster_jobs._submit_when_agent_ready(client, timeout_s=30, entrypoint="true")
    assert client.submitted == []


def test_a_cluster_that_cannot_be_asked_is_taken_as_remote_with_a_warning(capsys):
    """With no answer about its nodes, the cluster counts as remote (so this machine's paths are refused), and one
    warning line says why, without the address's password."""
    address = f"http://user:pa55word@127.0.0.1:{free_port()}"
    assert cluster_jobs.cluster_is_local(address) is False
    err = capsys.readouterr().err
    assert err.startswith("xcm: warning: cannot ask the cluster at") and err.count("\n") == 1, err
    assert "taking it as remote" in err and "pa55word" not in err

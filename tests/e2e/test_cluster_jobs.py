"""Jobs on a real Ray head started by the test: submit, follow, succeed, stop, and the bad-input lines."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import cluster_jobs
from orchestrator.metric_names import RESUMED_FROM_STEP, TASK_LOSS
from orchestrator.train import checkpoint_store as store
from orchestrator.train.resume import locate
from tests.helpers import NO_MODEL_LOGGING, ROOT, free_port, run_xcm, tiny_spec

# The cluster verbs answer within seconds; a hung one fails its test after 2 minutes.
xcm = functools.partial(run_xcm, timeout=120)


def started_head(log_directory: Path, wrapper: list[str] = (), gcs_port: int | None = None):
    """`ray start --head --block` on 127.0.0.1 with the dashboard (under ``wrapper``, a command that runs it; its
    GCS on ``gcs_port``, or any free port); yields its dashboard address once `xcm list` answers. Stopped by
    signalling that process alone (`ray stop` would kill every Ray on the machine). Its own temporary directory:
    the head's address file (`ray_current_cluster`) would otherwise outlive it in /tmp/ray."""
    dashboard_port = free_port()
    # Short: Ray's socket paths under it must stay within the 107 characters of a Unix socket name.
    ray_tmpdir = tempfile.mkdtemp(prefix="xcm-head-", dir="/tmp")
    command = [
        *wrapper,
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port or free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        "--temp-dir",
        ray_tmpdir,
    ]
    log = log_directory / "head.log"
    with open(log, "w") as output:
        # As a user would: the head runs in the environment where xcm is installed, so `python` finds it.
        environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        head = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 90
    try:
        while xcm("list", "--address", address, cwd=log_directory).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:  # a graceful stop drains every process one by one (~30 s on 2 cores)
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on this machine."""
    yield from started_head(tmp_path_factory.mktemp("ray-head"))


@pytest.fixture(scope="module")
def head_elsewhere(tmp_path_factory):
    """A real Ray head that is another machine to xcm, reached at 127.0.0.1 as through a tunnel: it runs in a UTS
    namespace of its own, under another hostname (root, or unprivileged user namespaces, needed). Its dashboard's
    address and its GCS's (what RAY_ADDRESS names)."""
    wrapper = [
        "unshare",
        "--uts",
        *([] if os.geteuid() == 0 else ["--map-root-user"]),
        "sh",
        "-c",
        'hostname xcm-remote-head && exec "$0" "$@"',
    ]
    if subprocess.run([*wrapper, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare --uts is not permitted here")
    gcs_port = free_port()
    for address in started_head(tmp_path_factory.mktemp("ray-head-elsewhere"), wrapper, gcs_port):
        yield address, f"127.0.0.1:{gcs_port}"


@pytest.fixture(scope="module")
def ray_head_elsewhere(head_elsewhere):
    return head_elsewhere[0]


def wait_for_status(address: str, job_id: str, wanted: set[str], workdir: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = xcm("status", job_id, "--address", address, cwd=workdir).stdout.splitlines()[0]
        status = line.split(": ")[1].split()[0]
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(2)


def submitted_ids(output: str) -> tuple[str, str]:
    job_id = next(line.split()[3] for line in output.splitlines() if line.startswith("xcm: submitted job"))
    link = next(line for line in output.splitlines() if "MLflow run:" in line)
    run_id = link.rsplit("/runs/", 1)[1].split("?", 1)[0]  # the link may carry the UI's view as a query
    return job_id, run_id


@pytest.mark.slow
def test_submitted_job_succeeds_and_is_tracked(ray_head, tmp_path):
    """A submitted tiny job runs on the head, its logs can be followed, and MLflow's client reads its metrics."""
    submitted = xcm(
        "submit",
        str(ROOT / "jobs" / "tiny.yaml"),
        "--set",
        "training.steps=12",
        "--set",
        "training.report_every=12",
        "--set",
        NO_MODEL_LOGGING,
        "--address",
        ray_head,
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id, run_id = submitted_ids(submitted.stdout)
    followed = xcm("logs", job_id, "--follow", "--address", ray_head, cwd=tmp_path, timeout=400)
    assert f"xcm: run {run_id} finished" in followed.stdout
    assert wait_for_status(ray_head, job_id, {"SUCCEEDED", "FAILED"}, tmp_path, 60) == "SUCCEEDED"
    assert job_id in xcm("list", "--address", ray_head, cwd=tmp_path).stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "task_loss")] == list(range(12))


@pytest.mark.slow
def test_stopped_job_ends_killed_keeps_its_checkpoint_and_resumes(ray_head, tmp_path):
    """`xcm stop` ends the job STOPPED, its MLflow run KILLED, and the checkpoints written so far stay; `xcm resume
    RUN_ID --address` continues that run on the cluster from its newest checkpoint to the end, each step once."""
    submitted = xcm(
        "submit",
        str(ROOT / "jobs" / "tiny.yaml"),
        "--set",
        "training.steps=100000",
        "--set",
        NO_MODEL_LOGGING,
        "--set",
        "checkpointing.every_steps=5",
        "--set",
        "training.report_every=5",
        "--address",
        ray_head,
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id, run_id = submitted_ids(submitted.stdout)
    checkpoints = tmp_path / "xcm-runs" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(checkpoints.rglob("*model_states.pt")):
        assert time.monotonic() < deadline, xcm("logs", job_id, "--address", ray_head, cwd=tmp_path).stdout[-3000:]
        time.sleep(2)
    stopped = xcm("stop", job_id, "--address", ray_head, cwd=tmp_path)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    assert wait_for_status(ray_head, job_id, {"STOPPED"}, tmp_path, 90) == "STOPPED"
    uri = f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"
    kept = locate(run_id, uri).state.step
    # To the step of the next checkpoint, which the stop interrupted: the stopped run logged at most the steps
    # before it, so the resumed run recomputes some steps already logged and logs the rest.
    steps = kept + 5
    resubmitted = xcm("resume", run_id, "--set", f"training.steps={steps}", "--address", ray_head, cwd=tmp_path)
    assert resubmitted.returncode == 0, resubmitted.stderr[-3000:]
    resume_job_id, same_run_id = submitted_ids(resubmitted.stdout)
    assert same_run_id == run_id
    followed = xcm("logs", resume_job_id, "--follow", "--address", ray_head, cwd=tmp_path, timeout=400)
    assert f"xcm: run {run_id} finished" in followed.stdout, followed.stdout[-3000:]
    assert wait_for_status(ray_head, resume_job_id, {"SUCCEEDED", "FAILED"}, tmp_path, 60) == "SUCCEEDED"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, RESUMED_FROM_STEP)] == [(kept, kept)]
    assert [m.step for m in client.get_metric_history(run_id, TASK_LOSS)] == list(range(steps))


def test_unknown_job_id_is_one_clear_line(ray_head, tmp_path):
    """Asking for a job that does not exist names it and points to `xcm list`."""
    result = xcm("status", "xcm-nope-123", "--address", ray_head, cwd=tmp_path)
    assert result.returncode == 1 and "no job 'xcm-nope-123'" in result.stderr and "xcm list" in result.stderr


def test_unreachable_address_is_one_clear_line(tmp_path):
    """A dashboard address where nothing listens fails at once with how to start a head."""
    result = xcm("list", "--address", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1 and "no Ray dashboard answers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_local_head_is_recognised_as_local(ray_head):
    """A head started on this machine, asked through its dashboard, reports only this machine's node."""
    assert cluster_jobs.cluster_is_local(ray_head)


def test_head_elsewhere_behind_localhost_is_refused_local_paths(ray_head_elsewhere, tmp_path):
    """Submitting through 127.0.0.1 to a head that runs on another machine (its node has another hostname)
    refuses the local SQLite store and checkpoint path, and creates nothing here."""
    result = xcm("submit", str(ROOT / "jobs" / "tiny.yaml"), "--address", ray_head_elsewhere, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tracking.uri" in result.stderr and "checkpointing.storage_path" in result.stderr
    assert "warning" not in result.stderr  # the cluster answered: it was asked, not guessed
    assert not (tmp_path / "xcm-runs").exists()


@pytest.mark.slow
def test_xcm_run_joining_a_head_elsewhere_is_refused_local_paths(head_elsewhere, tmp_path):
    """`xcm run` with RAY_ADDRESS naming a cluster on another machine exits 2 naming the local store and checkpoint
    path its nodes cannot see (their metrics and checkpoints would be lost there), and its run ends FAILED with
    them; nothing trains."""
    # The driver joins as from one of the cluster's nodes (Ray takes 127.0.0.1 for this node's address, as the head's).
    environment = {"RAY_ADDRESS": head_elsewhere[1], "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    result = run_xcm("run", str(ROOT / "jobs" / "tiny.yaml"), cwd=tmp_path, timeout=300, env=environment)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    refused = [line for line in result.stderr.splitlines() if line.startswith("the job for the cluster at RAY_ADDRESS")]
    assert any(": tracking.uri: " in line for line in refused) and any(
        "checkpointing.storage_path" in line for line in refused
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xcm-tiny").experiment_id])
    assert run.info.status == "FAILED" and "checkpointing.storage_path" in run.data.tags["xcm.failure"]
    assert not list((tmp_path / "xcm-runs" / "checkpoints").glob("*/step-*"))


def test_resume_on_a_head_elsewhere_refuses_a_checkpoint_on_this_machine(
    ray_head_elsewhere, tmp_path, checkpoint_files
):
    """`xcm resume --address` through 127.0.0.1 to a head on another machine refuses a checkpoint whose job keeps
    its checkpoints and token cache on this machine, naming each key."""
    run = tmp_path / "xcm-runs" / "checkpoints" / "tiny-01234567"
    checkpoint = checkpoint_files.write(run, 10, manifest=False)
    spec = tiny_spec("tracking.uri=http://mlflow-host:5000").resolved(tmp_path)
    (checkpoint / store.JOB).write_text(spec.to_yaml())
    store.write_manifest(checkpoint, store.file_records(checkpoint))
    result = xcm(
        "resume",
        str(run),
        "--set",
        "training.steps=20",
        "--tracking-uri",
        "http://mlflow-host:5000",
        "--address",
        ray_head_elsewhere,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "checkpointing.storage_path" in result.stderr and "data.cache_dir" in result.stderr


def test_cluster_that_cannot_be_asked_is_taken_as_remote(tmp_path):
    """A cluster that does not answer is taken as remote, with one warning line: the local SQLite store and
    checkpoint path are refused before anything is created."""
    result = xcm("submit", str(ROOT / "jobs" / "tiny.yaml"), "--address", "http://ray-head.invalid:8265", cwd=tmp_path)
    assert result.returncode == 2
    assert "tracking.uri" in result.stderr and "checkpointing.storage_path" in result.stderr
    assert next(line for line in result.stderr.splitlines() if "warning" in line).startswith(
        "xcm: warning: cannot ask the cluster at http://ray-head.invalid:8265"
    )
    assert not (tmp_path / "xcm-runs").exists()


def test_remote_resume_refuses_a_local_store(tmp_path):
    """Resuming on a remote cluster from this machine's SQLite store fails in one line naming --tracking-uri
    (after the warning that the cluster could not be asked)."""
    result = xcm("resume", "0123abcd", "--address", "http://ray-head.invalid:8265", cwd=tmp_path)
    assert result.returncode == 1 and "--tracking-uri http://" in result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("xcm: warning:") and error.startswith("xcm: the cluster at")


def test_invalid_job_file_is_refused_before_submission(tmp_path):
    """An invalid job file fails `xcm submit` with its problems, exit code 2."""
    job = tmp_path / "bad.yaml"
    job.write_text("training:\n  steps: many\n")
    result = xcm("submit", str(job), "--address", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 2 and "training.steps" in result.stderr


PASSWORD = "xcm-e2e-Secret-4d2a"  # MLflow wants 12 characters or more for its admin's password
ACCESS_KEY = "AKIAXCME2ETEST"
BUCKET = "xcm-e2e"


@pytest.fixture
def auth_mlflow(mlflow_server, tmp_path):
    """A real MLflow server running its basic-auth app: a request without the admin's password gets 401."""
    config = tmp_path / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///basic_auth.db\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return mlflow_server(
        "auth-server",
        ["--app-name", "basic-auth"],
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only",
        },
    )


@pytest.fixture
def s3_bucket(monkeypatch):
    """A local S3-compatible server (moto) with one bucket: its pyarrow filesystem and its storage URI's query.
    This process starts with no AWS credentials of its own."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    filesystem = pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}",
        scheme="http",
        region="us-east-1",
        access_key=ACCESS_KEY,
        secret_key=PASSWORD,
        allow_bucket_creation=True,
    )
    filesystem.create_dir(BUCKET)
    yield filesystem, f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def stored_objects(filesystem, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` of an S3 filesystem, by path."""
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {
        info.path: filesystem.open_input_stream(info.path).read() for info in infos if info.type == pafs.FileType.File
    }


@pytest.mark.slow
def test_credentials_in_uris_are_neither_stored_nor_shown(ray_head, auth_mlflow, s3_bucket, tmp_path, monkeypatch):
    """A run logged to a password-protected MLflow as http://admin:PASSWORD@host, with checkpoints on S3 as
    s3://KEY:PASSWORD@bucket/..., trains and logs every step (the password reached the driver, the workers and the
    metric sender through the environment), and the password is in none of its params, its spec.yaml, any object
    the run stored on S3 (its checkpoint's job.yaml, Ray Train's own state) or what xcm printed; nor in the
    entrypoint, metadata or runtime environment of the Ray jobs that `xcm resume --address` and `xcm submit` send,
    in `xcm status`, `xcm list` or the jobs' logs. The submitted job, whose cluster has no password, fails with
    401."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    filesystem, query = s3_bucket
    uri = auth_mlflow.uri.replace("http://", f"http://admin:{PASSWORD}@")
    storage = f"s3://{ACCESS_KEY}:{PASSWORD}@{BUCKET}/runs?{query}"
    ran = xcm(
        "run",
        str(ROOT / "jobs" / "tiny.yaml"),
        "--set",
        "training.steps=3",
        "--set",
        "training.report_every=3",
        "--set",
        "evaluation.every_steps=0",
        "--set",
        f"tracking.uri={uri}",
        "--set",
        f"checkpointing.storage_path={storage}",
        cwd=tmp_path,
        timeout=400,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    run_id = next(line.split()[2] for line in ran.stdout.splitlines() if line.startswith("xcm: run "))
    run_directory = f"s3://{ACCESS_KEY}:{PASSWORD}@{BUCKET}/runs/{store.run_directory_name('tiny', run_id)}?{query}"
    resumed = xcm(
        "resume", run_directory, "--set", "training.steps=6", "--tracking-uri", uri, "--address", ray_head, cwd=tmp_path
    )
    submitted = xcm(
        "submit", str(ROOT / "jobs" / "tiny.yaml"), "--set", f"tracking.uri={uri}", "--address", ray_head, cwd=tmp_path
    )
    assert resumed.returncode == 0 and submitted.returncode == 0, resumed.stderr[-2000:] + submitted.stderr[-2000:]
    assert "the cluster's nodes must have MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME" in submitted.stderr
    job_ids = [submitted_ids(resumed.stdout)[0], submitted_ids(submitted.stdout)[0]]
    xcm("stop", job_ids[0], "--address", ray_head, cwd=tmp_path)
    assert wait_for_status(ray_head, job_ids[1], {"FAILED", "SUCCEEDED"}, tmp_path, 300) == "FAILED"
    jobs = cluster_jobs.connect(ray_head)
    shown = [
        ran.stdout,
        ran.stderr,
        resumed.stdout,
        resumed.stderr,
        submitted.stdout,
        submitted.stderr,
        *(repr(jobs.get_job_info(job_id)) for job_id in job_ids),
        *(xcm("status", job_id, "--address", ray_head, cwd=tmp_path).stdout for job_id in job_ids),
        xcm("list", "--address", ray_head, cwd=tmp_path).stdout,
        jobs.get_job_logs(job_ids[1]),
    ]
    assert "401" in shown[-1] or "nauthorized" in shown[-1], shown[-1][-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=auth_mlflow.uri)
    params = client.get_run(run_id).data.params
    assert params["tracking.uri"] == auth_mlflow.uri and params["checkpointing.storage_path"] == storage.replace(
        f"{ACCESS_KEY}:{PASSWORD}@", ""
    )
    assert [m.step for m in client.get_metric_history(run_id, TASK_LOSS)] == [0, 1, 2]
    objects = stored_objects(filesystem, f"{BUCKET}/runs")
    assert [path for path in objects if path.endswith("/xcm/job.yaml")]
    stored = [*params.values(), Path(client.download_artifacts(run_id, "spec.yaml", str(tmp_path))).read_text()]
    assert [text for text in stored + shown if PASSWORD in text or ACCESS_KEY in text] == []
    assert [path for path, data in objects.items() if PASSWORD.encode() in data or ACCESS_KEY.encode() in data] == []

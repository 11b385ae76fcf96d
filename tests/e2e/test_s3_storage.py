"""A run whose checkpoints live on S3-compatible storage that fails partway through uploading one of them: the run
ends FAILED with the reason, the half-uploaded checkpoint is never taken for the newest, and `xcm resume` continues
from the previous intact one to the end, each step logged once. The storage is a moto server on 127.0.0.1 behind a
switch that answers 500 to the uploads of one checkpoint's optimizer shards."""

import re
import threading

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from orchestrator.metric_names import TASK_LOSS
from orchestrator.train import checkpoint_store as store
from orchestrator.train.resume import locate
from tests.helpers import NO_MODEL_LOGGING, TINY_JOB, run_xcm

BUCKET = "xcm-runs"
ACCESS_KEY, SECRET = "xcm-s3-key", "xcm-s3-secret-1234"
STEPS, EVERY = 15, 5
FAILING_CHECKPOINT = "/step-00000010/"  # its optimizer shards fail to upload


class FailingUploads:
    """WSGI middleware before moto: while ``failing``, every upload request (PUT or POST, multipart ones included)
    for a path containing all of ``fragments`` gets a 500, as a storage server that breaks down mid-checkpoint would
    answer (the client's retries fail too); the checkpoint's other files upload."""

    def __init__(self, app, *fragments: str):
        self.app, self.fragments = app, fragments
        self.failing, self.refused = True, 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if self.failing and environ["REQUEST_METHOD"] in ("PUT", "POST") and all(f in path for f in self.fragments):
            with self.lock:
                self.refused += 1
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
            return [b"<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>"]
        return self.app(environ, start_response)


@pytest.fixture
def failing_s3(monkeypatch):
    """The switch and a moto server behind it with one bucket; its filesystem and its storage URI's query."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    switch = FailingUploads(DomainDispatcherApplication(create_backend_app), FAILING_CHECKPOINT, "optim_states")
    server = make_server("127.0.0.1", 0, switch, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    filesystem = pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}",
        scheme="http",
        region="us-east-1",
        access_key=ACCESS_KEY,
        secret_key=SECRET,
        allow_bucket_creation=True,
    )
    filesystem.create_dir(BUCKET)
    yield switch, filesystem, f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.shutdown()
    thread.join()


@pytest.mark.slow
def test_upload_failing_mid_checkpoint_keeps_the_previous_one_newest_and_resume_continues(
    failing_s3, tmp_path, monkeypatch
):
    """Uploads of step 10's optimizer shards fail, its other files upload: the run ends FAILED naming the storage error;
    the checkpoint located for it is step 5, not the partial step 10; `xcm resume` runs steps 5-14 from it once the
    storage works again, and MLflow holds every step exactly once."""
    switch, filesystem, query = failing_s3
    storage = f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/runs?{query}"
    ran = run_xcm(
        "run",
        str(TINY_JOB),
        *("--set", f"training.steps={STEPS}", "--set", f"checkpointing.every_steps={EVERY}"),
        *("--set", f"training.report_every={EVERY}", "--set", "checkpointing.max_failures=0"),
        *("--set", "evaluation.every_steps=0", "--set", NO_MODEL_LOGGING),
        *("--set", f"checkpointing.storage_path={storage}"),
        cwd=tmp_path,
        timeout=400,
    )
    assert ran.returncode == 1, ran.stdout[-3000:]
    assert "Traceback" not in ran.stdout + ran.stderr, ran.stderr[-3000:]
    said = re.search(r"xcm: MLflow run [0-9a-f]{32} FAILED\n  cause: (.+)\n", ran.stdout)
    assert said and "optim_states" in said.group(1), ran.stdout[-3000:]
    assert switch.refused > 0, "no upload of step 10's checkpoint was refused"
    tracking_uri = f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xcm-tiny").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags.get("xcm.failure"), run.data.tags
    run_id = run.info.run_id

    run_directory = f"{BUCKET}/runs/{store.run_directory_name('tiny', run_id)}"
    partial = filesystem.get_file_info(
        pafs.FileSelector(f"{run_directory}/step-00000010", allow_not_found=True, recursive=True)
    )
    assert any(info.type == pafs.FileType.File for info in partial), "the failure left no partial checkpoint to skip"
    storage_uri = f"s3://{ACCESS_KEY}:{SECRET}@{run_directory}?{query}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # for this process's own look at the storage
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert locate(f"s3://{run_directory}?{query}", tracking_uri).state.step == EVERY

    switch.failing = False
    resumed = run_xcm("resume", storage_uri, "--tracking-uri", tracking_uri, cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [metric.step for metric in client.get_metric_history(run_id, TASK_LOSS)] == list(range(STEPS))
    assert locate(f"s3://{run_directory}?{query}", tracking_uri).state.step == STEPS

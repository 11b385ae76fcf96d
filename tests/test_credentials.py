"""Credentials in URIs leave them for the environment at the edge, and no stored or shown form of a spec has them."""

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import cli, credentials
from orchestrator.spec import SpecError
from orchestrator.tracking import MetricLogger
from orchestrator.train.job_checks import load_spec
from tests.helpers import free_port, tiny_spec

SECRET = "s3cret-9f1c"
VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OVERRIDES = [
    f"tracking.uri=http://alice:{SECRET}@mlflow-host:5000",
    f"checkpointing.storage_path=s3://AKIAEXAMPLE:{SECRET}%2Fx@bucket/runs?endpoint_override=minio:9000",
]


@pytest.fixture
def clean_environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_spec_credentials_move_into_the_environment(clean_environment):
    """The tracking server's and S3's credentials go to the variables MLflow and pyarrow read (percent-decoded);
    the spec keeps each URI without them, query string included."""
    spec, moved = credentials.take_from_spec(tiny_spec(*OVERRIDES))
    assert moved == sorted(VARIABLES)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("AKIAEXAMPLE", f"{SECRET}/x")
    assert spec.tracking.uri == "http://mlflow-host:5000"
    assert spec.checkpointing.storage_path == "s3://bucket/runs?endpoint_override=minio:9000"
    assert SECRET not in str(spec.model_dump()) and "AKIAEXAMPLE" not in str(spec.model_dump())


def test_credentials_where_xcm_cannot_pass_them_on_are_refused(clean_environment):
    """Credentials in a key that is not a storage URI, or for a scheme without known variables, stop the job with
    one line per key, neither line showing the secret; nothing is set."""
    spec = tiny_spec(
        "data.source=hub",
        f"data.dataset=https://bob:{SECRET}@example.org/corpus",
        f"checkpointing.storage_path=gs://bob:{SECRET}@bucket/runs",
    )
    with pytest.raises(SpecError) as raised:
        credentials.take_from_spec(spec)
    assert [problem.key for problem in raised.value.problems] == ["data.dataset", "checkpointing.storage_path"]
    assert SECRET not in str(raised.value) and "bob:***@" in str(raised.value)
    assert not any(name in os.environ for name in VARIABLES)


def test_stored_forms_of_a_spec_hold_no_credentials(tmp_path):
    """spec.yaml / job.yaml (``to_yaml``) and the MLflow params (``flat_params``) leave credentials out even of a
    spec that never passed the edge, and the YAML loads back as the same job without them."""
    spec = tiny_spec(*OVERRIDES)
    assert SECRET not in spec.to_yaml() and "AKIAEXAMPLE" not in spec.to_yaml()
    assert not [value for value in spec.flat_params().values() if SECRET in value or "AKIAEXAMPLE" in value]
    (tmp_path / "job.yaml").write_text(spec.to_yaml())
    reloaded = load_spec(tmp_path / "job.yaml")
    assert reloaded.tracking.uri == "http://mlflow-host:5000"
    assert yaml.safe_load(spec.to_yaml())["checkpointing"]["storage_path"].startswith("s3://bucket/runs?")


def test_redact_masks_every_secret_in_a_text():
    """A message shows the user and masks the password; a user alone (it may be a token) is masked whole."""
    text = f"GET http://alice:{SECRET}@mlflow:5000/api failed; s3://KEY:{SECRET}@b/p; https://{SECRET}@host/x"
    assert credentials.redact(text) == (
        "GET http://alice:***@mlflow:5000/api failed; s3://KEY:***@b/p; https://***@host/x"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_metric_sender_gets_credentials_in_its_environment_not_its_command_line(tmp_path):
    """The sender process's argv (what `ps` shows every user) has no secret; its environment carries it."""
    logger = MetricLogger(f"http://alice:{SECRET}@127.0.0.1:{free_port()}", "0" * 32, tmp_path / "spool.jsonl")
    try:
        pid = logger._sender.pid
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"" and time.monotonic() < deadline:
            time.sleep(0.1)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        environment = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    finally:
        logger.close(timeout_s=0)
    assert "orchestrator.metric_sender" in argv and "http://127.0.0.1:" in " ".join(argv)
    assert not [argument for argument in argv if SECRET in argument]
    assert f"MLFLOW_TRACKING_PASSWORD={SECRET}" in environment


def test_command_line_credentials_xcm_cannot_pass_on_are_one_line(tmp_path, capsys, clean_environment):
    """A URI argument with credentials for a scheme without known variables exits 1 with one redacted line."""
    assert cli.main(["export", f"gs://bob:{SECRET}@bucket/run", "--to", "hf", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("xcm: gs://bob:***@bucket/run carries credentials") and len(error.splitlines()) == 1
    assert SECRET not in error

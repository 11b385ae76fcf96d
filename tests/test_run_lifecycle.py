"""No MLflow run is left RUNNING: every failure between creating (or attaching) a run and training ends it FAILED
with the reason as its ``xcm.failure`` tag, read back with MLflow's own client. None of these paths starts Ray."""

import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from orchestrator import cli, tracking
from orchestrator.cluster_jobs import SUBMISSION_TAG, end_run_of_ended_job
from orchestrator.spec import INVALID_JOB_EXIT_CODE, SpecError
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job
from tests.helpers import ROOT, tiny_spec


def store_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'xcm-runs' / 'mlflow.db'}"


def created_run(workdir: Path, **tags: str) -> str:
    """A RUNNING run in the job's store, as `xcm submit` creates it before the cluster starts on it."""
    spec = tiny_spec().resolved(workdir)
    run_id = tracking.start_run(spec.tracking, "submitted", {})
    for key, value in tags.items():
        tracking.client(spec.tracking.uri).set_tag(run_id, key, value)
    return run_id


def only_run(workdir: Path):
    client = MlflowClient(tracking_uri=store_uri(workdir))
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


def test_params_the_store_refuses_end_the_new_run_failed(tmp_path):
    """A param MLflow refuses (here a key it cannot name) fails the job after the run exists: the run ends FAILED
    with the store's reason, not RUNNING forever."""
    spec = tiny_spec()
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"config": {"bad|key": 1}})})
    with pytest.raises(tracking.TrackingUnavailable, match="refused the job's params"):
        run_job(spec, tmp_path)
    run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE_TAG].startswith("params not logged: MlflowException")


def test_data_check_failure_ends_an_attached_run_failed(tmp_path):
    """A run attached rather than created (a submitted job's, or a resumed one's) whose data check fails where
    the driver runs ends FAILED, naming the missing file."""
    run_id = created_run(tmp_path)
    spec = load_spec(
        ROOT / "jobs" / "tiny.yaml",
        [
            "data.source=files",
            "data.files=[absent/*.txt]",
            "evaluation.every_steps=0",
            f"tracking.uri={store_uri(tmp_path)}",
            f"tracking.run_id={run_id}",
        ],
    )
    with pytest.raises(SpecError, match=r"data\.files"):
        run_job(spec, tmp_path)
    run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "data.files: no file matches" in run.data.tags[tracking.FAILURE_TAG]


def test_submitted_job_file_that_does_not_load_on_the_cluster_ends_its_run_failed(tmp_path, monkeypatch):
    """The job file `xcm submit` sends names its run; when it does not load where the driver runs (here a data
    file that only the submitting machine had), `xcm run` exits with the invalid-job code and ends the run FAILED."""
    run_id = created_run(tmp_path)
    spec = load_spec(
        ROOT / "jobs" / "tiny.yaml", ["data.source=files", "data.files=[corpus.txt]", "evaluation.every_steps=0"]
    ).resolved(tmp_path)
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"run_id": run_id})})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(job)]) == INVALID_JOB_EXIT_CODE
    run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "data.files: no file matches" in run.data.tags[tracking.FAILURE_TAG]


@pytest.mark.parametrize(("job_status", "run_status"), [("FAILED", "FAILED"), ("STOPPED", "KILLED")])
def test_a_job_that_died_before_its_driver_attached_ends_its_run(tmp_path, job_status, run_status):
    """A Ray job that ended with its run still RUNNING (runtime environment not set up, driver killed) has the
    run ended by `xcm status`, with the job's message; a job the run has since moved past leaves it alone."""
    run_id = created_run(tmp_path, **{SUBMISSION_TAG: "xcm-new"})
    end_run_of_ended_job("xcm-old", job_status, "driver OOM-killed", run_id, store_uri(tmp_path))
    assert only_run(tmp_path).info.status == "RUNNING"
    end_run_of_ended_job("xcm-new", job_status, "driver OOM-killed", run_id, store_uri(tmp_path))
    run = only_run(tmp_path)
    assert run.info.status == run_status
    assert "xcm-new ended " + job_status in run.data.tags[tracking.FAILURE_TAG]
    assert "driver OOM-killed" in run.data.tags[tracking.FAILURE_TAG]


def test_a_finished_job_leaves_its_run_alone(tmp_path):
    """A job that succeeded, or is still running, never changes its run's status."""
    run_id = created_run(tmp_path, **{SUBMISSION_TAG: "xcm-a"})
    for job_status in ("SUCCEEDED", "RUNNING", "PENDING"):
        end_run_of_ended_job("xcm-a", job_status, "", run_id, store_uri(tmp_path))
    assert only_run(tmp_path).info.status == "RUNNING"


def test_failure_tag_masks_credentials(tmp_path):
    """An error that quotes a URI with a password leaves the password out of the run's failure tag."""
    run_id = created_run(tmp_path)
    tracking.fail_run(store_uri(tmp_path), run_id, "cannot reach s3://key:secret-word@bucket/xcm")
    tag = only_run(tmp_path).data.tags[tracking.FAILURE_TAG]
    assert "secret-word" not in tag and "s3://key:***@bucket/xcm" in tag


def test_a_failed_run_says_its_cause_in_one_line_and_how_to_resume(tmp_path, capsys):
    """An error after the run exists ends it FAILED (MLflow), and the terminal gets the cause in one line (for Ray
    Train's error, the lowest failing rank's own), where the whole error is and the resume command; the traceback
    goes to stderr (the log file in a terminal session), and the error goes on as RunFailed."""
    from ray.train import WorkerGroupError

    from orchestrator.console import Console
    from orchestrator.train.launch import RunFailed, ending_run, resume_hint

    spec = tiny_spec().resolved(tmp_path)
    run_id = tracking.start_run(spec.tracking, spec.name, {})
    console = Console(sys.stdout)
    error = WorkerGroupError(
        "[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  ...\nOSError: rank 0 upload failed",
        {1: ValueError("second"), 0: OSError("When uploading 'step-00000010/optim_states.pt': HTTP 500")},
    )
    with pytest.raises(RunFailed) as raised, resume_hint(console, spec, run_id), ending_run(spec.tracking.uri, run_id):
        raise error
    assert raised.value.__cause__ is error
    out, err = capsys.readouterr()
    assert f"xcm: MLflow run {run_id} FAILED; no checkpoint was written: resuming starts it over\n" in out
    assert "  cause: rank 0: OSError: When uploading 'step-00000010/optim_states.pt': HTTP 500\n" in out
    assert "  resume it:  xcm resume " in out and "Traceback" not in out and "WorkerGroupError" in err
    assert only_run(tmp_path).info.status == "FAILED"


def test_failure_summary_of_a_traceback_is_its_last_line():
    """An error whose message is a traceback (Ray's task errors) is summarised by the line naming the exception."""
    from orchestrator.train.launch import failure_summary

    quoted = RuntimeError("Traceback (most recent call last):\n  File 'x.py', line 1\nKeyError: 'lr'\n")
    assert failure_summary(quoted) == "RuntimeError: KeyError: 'lr'"
    assert failure_summary(ValueError("bad\nsecond line")) == "ValueError: bad"

"""The comparison report, built from a real MLflow store alone: child runs by their parent tag, their last
metric values, the plan the parent logged; Markdown, Parquet and PNG artifacts in the parent run."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.experiments import report as reporting

# (variant, seed) -> final values; the control's accuracy and the clustered run's differ by 0.4, 0.2, 0.3.
VALUES = {
    ("control", 0): {"eval/accuracy": 0.5, "clusterability": 0.30, "circuits/size/add": 40.0},
    ("control", 1): {"eval/accuracy": 0.6, "clusterability": 0.31, "circuits/size/add": 44.0},
    ("control", 2): {"eval/accuracy": 0.4, "clusterability": 0.29, "circuits/size/add": 42.0},
    ("clustered", 0): {"eval/accuracy": 0.9, "clusterability": 0.90, "circuits/size/add": 20.0},
    ("clustered", 1): {"eval/accuracy": 0.8, "clusterability": 0.91, "circuits/size/add": 22.0},
    ("clustered", 2): {"eval/accuracy": 0.7, "clusterability": 0.92, "circuits/size/add": 24.0},
}


@pytest.fixture
def store(tmp_path):
    """A parent run with six finished child runs and one failed one, in a SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    client.log_text(
        parent,
        reporting.plan_record(["control", "clustered"], {"control": None, "clustered": "control"}, (0, 1, 2), None),
        reporting.PLAN_ARTIFACT,
    )
    for (variant, seed), metrics in VALUES.items():
        run = client.create_run(
            experiment,
            tags={reporting.PARENT_TAG: parent, reporting.VARIANT_TAG: variant, reporting.SEED_TAG: str(seed)},
        ).info.run_id
        for key, value in metrics.items():
            client.log_metric(run, key, value * 3, step=0)  # an earlier value: the last one counts
            client.log_metric(run, key, value, step=10)
        client.set_terminated(run, "FINISHED")
    failed = client.create_run(
        experiment, tags={reporting.PARENT_TAG: parent, reporting.VARIANT_TAG: "clustered", reporting.SEED_TAG: "3"}
    ).info.run_id
    client.log_metric(failed, "eval/accuracy", 0.0)
    client.set_terminated(failed, "FAILED")
    client.create_run(experiment)  # an unrelated run in the same experiment
    return uri, client, parent, failed


def test_report_compares_last_values_of_finished_children_with_the_control(store, tmp_path):
    """The clustered row's paired difference is the hand-computed 0.3 with its interval; the failed child is
    listed, not counted; circuit sizes appear without being asked for, and so do their plots."""
    _, client, parent, failed = store
    report = reporting.write_report(client, parent)
    assert list(report.tables) == ["clusterability", "eval/accuracy", "circuits/size/add"]
    clustered = report.tables["eval/accuracy"][1]
    assert clustered["variant"] == "clustered" and clustered["n"] == 3 and clustered["pairs"] == 3
    assert clustered["difference"] == pytest.approx(0.3)
    assert clustered["difference_low"] == pytest.approx(0.3 - 4.302652729911275 * 0.1 / math.sqrt(3))
    assert report.tables["circuits/size/add"][1]["difference"] == pytest.approx(-20.0)
    assert f"clustered seed 3 (FAILED, run {failed})" in report.markdown
    assert [(t.variant, t.seed) for t in report.trials] == [  # in the plan's order: the control first
        ("control", 0),
        ("control", 1),
        ("control", 2),
        ("clustered", 0),
        ("clustered", 1),
        ("clustered", 2),
        ("clustered", 3),
    ]
    downloaded = Path(client.download_artifacts(parent, reporting.REPORT_DIRECTORY, str(tmp_path / "out")))
    assert "| clustered | 3 | 0.8 ± 0.1 | control | 0.5 ± 0.1 | 0.3 |" in (downloaded / "comparison.md").read_text()
    table = pq.read_table(downloaded / "tables" / "eval__accuracy.parquet").to_pylist()
    assert [row["variant"] for row in table] == ["control", "clustered"]
    assert table[1]["control_mean"] == pytest.approx(0.5)
    trials = pq.read_table(downloaded / "trials.parquet").to_pylist()
    assert len(trials) == 3 * 6 + 1
    for name in ("tradeoff-eval__accuracy.png", "circuit-size.png"):
        assert (downloaded / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_xcm_experiment_report_rebuilds_it_from_the_store(store, capsys):
    """`xcm experiment --report PARENT_RUN_ID` prints the same comparison; an unknown run is one line, exit 1."""
    uri, _, parent, _ = store
    assert main(["experiment", "--report", parent, "--tracking-uri", uri]) == 0
    assert "## eval/accuracy" in capsys.readouterr().out
    assert main(["experiment", "--report", "0" * 32, "--tracking-uri", uri]) == 1
    error = capsys.readouterr().err
    assert error.startswith("xcm: cannot rebuild the report of run 000") and len(error.splitlines()) == 1

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


# What the circuits side job logs for two digit-label tasks: the clustered runs' circuits are smaller by
# 0.10 and 0.20 (mean 0.15) at every seed, attribution's at τ = 0.9 by 0.05; the specialization index is the
# same, its z against the null lower by 1.0, 0.0, 2.0. The methods' detail and timing are not compared.
CIRCUITS = {
    ("control", 0): {"index": 0.30, "z": 3.0, "sizes": (0.40, 0.50), "tau": (0.20, 0.30)},
    ("control", 1): {"index": 0.32, "z": 2.0, "sizes": (0.42, 0.52), "tau": (0.22, 0.32)},
    ("control", 2): {"index": 0.34, "z": 4.0, "sizes": (0.44, 0.54), "tau": (0.24, 0.34)},
    ("clustered", 0): {"index": 0.30, "z": 2.0, "sizes": (0.30, 0.30), "tau": (0.15, 0.25)},
    ("clustered", 1): {"index": 0.32, "z": 2.0, "sizes": (0.32, 0.32), "tau": (0.17, 0.27)},
    ("clustered", 2): {"index": 0.34, "z": 2.0, "sizes": (0.34, 0.34), "tau": (0.19, 0.29)},
}
TASKS = ("label_0", "label_1")


def circuit_metrics(values: dict) -> dict[str, float]:
    metrics = {"specialization/index": values["index"], "specialization/index_z": values["z"]}
    metrics |= {"specialization/depends_on/1": 0.5, "circuits/seconds": 12.0}
    for task, size, tau in zip(TASKS, values["sizes"], values["tau"], strict=True):
        metrics |= {f"circuits/size/{task}": size, f"circuits/size/{task}/tau0.9": tau}
        metrics |= {f"circuits/greedy/{task}/loss": 0.1, f"circuits/locality/{task}": 0.5}
    return metrics


def parent_with_children(tmp_path, values: dict) -> tuple[str, MlflowClient, str, str]:
    """A parent run with a finished child run per (variant, seed) of `values` and one failed one, in a SQLite
    store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    client.log_text(
        parent,
        reporting.plan_record(["control", "clustered"], {"control": None, "clustered": "control"}, (0, 1, 2), None),
        reporting.PLAN_ARTIFACT,
    )
    for (variant, seed), metrics in values.items():
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


@pytest.fixture
def store(tmp_path):
    return parent_with_children(tmp_path, VALUES)


def test_report_compares_last_values_of_finished_children_with_the_control(store, tmp_path):
    """The clustered row's paired difference is the hand-computed 0.3 with its interval; the failed child is
    listed, not counted; circuit sizes appear without being asked for, and so do their plots."""
    _, client, parent, failed = store
    report = reporting.write_report(client, parent)
    assert list(report.tables) == ["clusterability", "eval/accuracy", "circuits/mean_size", "circuits/size/add"]
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
    assert len(trials) == 4 * 6 + 1  # the three logged metrics and the mean circuit size, and the failed run's
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


def test_report_compares_circuit_sizes_per_task_and_the_specialization_index_with_its_null(tmp_path):
    """From the circuits side job's final values: the mean circuit size over tasks (greedy's and attribution's
    at τ = 0.9) paired with the control (hand-computed −0.15 and −0.05), one table per family with a row per task,
    the specialization index (Δ 0) and its null z (Δ −1 with its t-interval); timings and the methods' detail
    are left out; the circuit-size plot is drawn."""
    _, client, parent, _ = parent_with_children(tmp_path, {key: circuit_metrics(v) for key, v in CIRCUITS.items()})
    report = reporting.write_report(client, parent)
    assert list(report.tables) == [
        "specialization/index",
        "specialization/index_z",
        "circuits/mean_size",
        "circuits/mean_size/tau0.9",
        "circuits/locality/label_0",
        "circuits/locality/label_1",
        "circuits/size/label_0",
        "circuits/size/label_1",
        "circuits/size/label_0/tau0.9",
        "circuits/size/label_1/tau0.9",
    ]
    clustered = {metric: rows[1] for metric, rows in report.tables.items()}
    assert clustered["circuits/mean_size"]["difference"] == pytest.approx(-0.15)
    assert clustered["circuits/mean_size"]["difference_low"] == pytest.approx(-0.15)  # the same at every seed
    assert clustered["circuits/mean_size/tau0.9"]["difference"] == pytest.approx(-0.05)
    assert clustered["circuits/size/label_1"]["difference"] == pytest.approx(-0.20)
    assert clustered["specialization/index"]["difference"] == pytest.approx(0.0)
    z = clustered["specialization/index_z"]
    assert (z["difference"], z["control_mean"]) == (pytest.approx(-1.0), pytest.approx(3.0))
    assert z["difference_high"] == pytest.approx(-1.0 + 4.302652729911275 * 1.0 / math.sqrt(3))
    assert "## circuits/size/<task>\n\n| task | variant | n |" in report.markdown
    assert "| label_1 | clustered | 3 | 0.32 ± 0.02 | control | 0.52 ± 0.02 | -0.2 |" in report.markdown
    assert "## circuits/size/<task>/tau0.9" in report.markdown and "## circuits/size/label_0" not in report.markdown
    downloaded = Path(client.download_artifacts(parent, reporting.REPORT_DIRECTORY, str(tmp_path / "out")))
    assert (downloaded / "circuit-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (downloaded / "tables" / "circuits__mean_size__tau0.9.parquet").exists()

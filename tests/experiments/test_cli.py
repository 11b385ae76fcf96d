"""`xcm experiment` and `xcm sweep` refuse bad input before anything starts: one line per problem, exit 2."""

from pathlib import Path

from orchestrator.cli import main
from orchestrator.spec import INVALID_JOB_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]


def test_bad_experiment_file_exits_2_with_one_line_per_problem_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """Two bad variants: two lines naming the file, the variant and the key; no MLflow store, no Ray started."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "job: {name: x}\nvariants:\n  control: {modularity.lambda: 0, training.lr: fast}\n  other: {modularity.kk: 3}\n"
    )
    assert main(["experiment", str(path)]) == INVALID_JOB_EXIT_CODE
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}: variants.control: training.lr: ")
    assert lines[1].startswith(f"{path}: variants.other: modularity.kk: unknown key")
    assert not (tmp_path / "xcm-runs").exists()


def test_experiment_without_a_file_or_report_exits_2(capsys):
    """`xcm experiment` alone says what to pass."""
    assert main(["experiment"]) == INVALID_JOB_EXIT_CODE
    assert "name an experiment file" in capsys.readouterr().err


def test_sweep_with_a_bad_grid_exits_2(tmp_path, monkeypatch, capsys):
    """A grid value the job refuses (a negative λ) is the job's own error line, before any trial."""
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(ROOT / "jobs" / "tiny.yaml"), "--grid", "modularity.lambda=0,-1", "--seeds", "2"])
    assert code == INVALID_JOB_EXIT_CODE
    assert "variants.lambda-1: modularity.lambda" in capsys.readouterr().err
    assert not (tmp_path / "xcm-runs").exists()

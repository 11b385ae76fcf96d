"""The `xcm` command line in-process, without Ray: what each verb parses, its exit code, and its one-line errors."""

import argparse
import os
import subprocess
import sys

import pytest

from orchestrator import cli, cluster_jobs
from orchestrator.spec import INVALID_JOB_EXIT_CODE
from tests.helpers import ROOT, TINY_JOB, free_port


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own directory: a verb that opens the default store creates it there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_check_reports_each_job_and_exits_with_the_invalid_job_code_if_any_fails(tmp_path, capsys):
    """`xcm check GOOD BAD`: GOOD is ok on stdout, BAD's key on stderr, and the exit code is the invalid-job one."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  stepz: 3\n")
    assert cli.main(["check", str(TINY_JOB), str(bad)]) == INVALID_JOB_EXIT_CODE
    out, err = capsys.readouterr()
    assert out == f"{TINY_JOB}: ok\n"
    assert "training.stepz" in err and "Traceback" not in err


def test_check_of_valid_jobs_exits_0(capsys):
    """Only valid jobs: exit 0 and nothing on stderr."""
    assert cli.main(["check", str(TINY_JOB)]) == 0
    assert capsys.readouterr().err == ""


TEXT_FILES = ("  source: synthetic\n", "  source: files\n  files: [corpus.txt]\n")  # tiny.yaml on a text file


def job_with_circuits(tmp_path, base: str, circuits: str, edit: tuple[str, str] = ("", "")):
    """`jobs/<base>.yaml` (with `edit`'s text replaced) and a circuits section measuring every 30 steps, as a job
    file under `tmp_path`."""
    job = tmp_path / f"{base}-circuits-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    text = (ROOT / "jobs" / f"{base}.yaml").read_text().replace(*edit)
    job.write_text(text + f"circuits:\n  every_steps: 30\n{circuits}")
    return job


@pytest.mark.parametrize(
    ("base", "circuits", "edit", "message"),
    [
        ("tiny", "  tasks: [synthetic:add, synthetic:nope]\n", ("", ""), "no task(s) ['nope']; choose from"),
        ("tiny", "  tasks: [labels]\n", ("", ""), "needs a classifier model, and this one is a language"),
        ("tiny", "  tasks: [synthetic:add, 'synthetic:copy,add']\n", ("", ""), "tasks ['add'] are named twice"),
        ("tiny", "  tasks: [jsonl:qa.jsonl]\n", ("", ""), "task file 'qa.jsonl' is not a regular file"),
        ("tiny", "", TEXT_FILES, "the model has no tasks of its own"),
        ("mnist_mlp", "  tasks: ['labels:0+1,10']\n", ("", ""), "classes [10] have no examples"),
        ("modular_addition", "", ("", ""), "113 tasks: give between 1 and 64"),
    ],
)
def test_check_and_run_refuse_circuit_tasks_the_job_cannot_measure(tmp_path, capsys, base, circuits, edit, message):
    """A circuits task that does not exist for the model or its data, one named twice, a missing task file, or no
    task at all (a language model not trained on the synthetic corpus; modular addition's 113 answers are over
    the 64 tasks a set holds): `xcm check` and `xcm run` refuse the job in one line on circuits.tasks, with its
    fix, before anything starts."""
    (tmp_path / "corpus.txt").write_text("some text to train on\n" * 100)
    job = job_with_circuits(tmp_path, base, circuits, edit)
    for verb in ("check", "run"):
        assert cli.main([verb, str(job)]) == INVALID_JOB_EXIT_CODE
        (line,) = capsys.readouterr().err.splitlines()
        assert ": circuits.tasks: " in line and message in line and "Fix: list tasks this model" in line, line
    assert not (tmp_path / "xcm-runs").exists()


def test_check_passes_circuit_tasks_the_job_can_measure(tmp_path, capsys):
    """Tasks the model and its data have, and a task file in the directory the job runs from, pass `xcm check`."""
    (tmp_path / "qa.jsonl").write_text('{"prompt": "p", "answer": "a"}\n' * 2)
    (tmp_path / "corpus.txt").write_text("some text to train on\n" * 100)
    jobs = [
        job_with_circuits(tmp_path, "tiny", ""),
        job_with_circuits(tmp_path, "tiny", "  tasks: [jsonl:qa.jsonl]\n", TEXT_FILES),
        job_with_circuits(tmp_path, "mnist_mlp", "  tasks: ['labels:0+1+2,3']\n"),
    ]
    assert cli.main(["check", *map(str, jobs)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["measure", "some-model", "--k", "1"], "xcm: --k '1': give a count >= 2"),
        (["circuits", "some-model", "--k", "1"], "xcm: --k 1: give at least 2 clusters"),
        (["circuits", "some-model", "--taus", "high"], "xcm: --taus: "),
        (["circuits", "some-model", "--ig-steps", "0"], "xcm: --ig-steps: "),
    ],
)
def test_bad_option_values_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    """A value argparse accepts but the verb cannot use is one line naming the flag, exit 2, no store created."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "xcm-runs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "some-run", "--to", "onnx", "out"],  # not a format xcm writes
        ["export", "some-run", "out"],  # --to is required
        ["measure", "some-model", "--seed", "one"],  # not an integer
        ["no-such-verb"],
    ],
)
def test_what_argparse_refuses_exits_2_with_usage(argv, capsys):
    """Malformed command lines stop in argparse: exit 2 and the usage line, before any verb runs."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    assert "usage: xcm" in capsys.readouterr().err


def test_export_of_an_unknown_run_is_one_line_exit_1(tmp_path, capsys):
    """`xcm export` of a name that is neither a path nor a run id says so and how to point at the run."""
    assert cli.main(["export", "no-such-run", "--to", "hf", str(tmp_path / "model")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if " INFO mlflow" not in line]  # store creation
    assert len(lines) == 1 and lines[0].startswith("xcm: 'no-such-run' is neither a path nor an xcm run"), lines
    assert "--tracking-uri" in lines[0]
    assert not (tmp_path / "model").exists()


def test_cluster_verbs_with_no_dashboard_are_one_line_exit_1(capsys):
    """`xcm stop/status/list` against an address where no dashboard answers: one line naming the address."""
    address = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ["stop", "xcm-1", "--address", address],
        ["status", "xcm-1", "--address", address],
        ["list", "--address", address],
    ):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"xcm: no Ray dashboard answers at {address}") and err.count("\n") == 1, err


def test_ui_of_a_tracking_server_prints_its_address_without_credentials(tmp_path, capsys):
    """`xcm ui` of a job tracked on a server points at the server (nothing to start) and never shows its password."""
    job = tmp_path / "job.yaml"
    job.write_text("tracking:\n  uri: http://alice:pw-123456@mlflow-host:5000\n")
    assert cli.main(["ui", str(job)]) == 0
    out, err = capsys.readouterr()
    assert out == "xcm: http://mlflow-host:5000 is a tracking server: open it in a browser\n"
    assert "pw-123456" not in out + err


@pytest.mark.parametrize(
    ("flag", "environment", "expected"),
    [
        ("http://head:8265", "http://other:8265", "http://head:8265"),  # the flag wins
        (None, "https://head:8265", "https://head:8265"),  # a dashboard address in RAY_ADDRESS
        (None, "127.0.0.1:6379", cluster_jobs.DEFAULT_ADDRESS),  # a GCS address is not the Jobs API
        (None, None, cluster_jobs.DEFAULT_ADDRESS),
    ],
)
def test_cluster_address_comes_from_the_flag_then_an_http_ray_address(flag, environment, expected, monkeypatch):
    """--address, else RAY_ADDRESS when it is a dashboard URL (http[s]://), else the local default."""
    if environment is not None:
        monkeypatch.setenv("RAY_ADDRESS", environment)
    assert cli._address(argparse.Namespace(address=flag)) == expected


# `xcm check` called as CALL says, after an exit handler registered first, which therefore runs after the command's
# own: how many objects were frozen by then.
FROZEN_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count(), flush=True))
from orchestrator import cli
job = sys.argv[1]
sys.argv = ["xcm", "check", job]
CALL
"""


@pytest.mark.parametrize("call", ["cli.main()", "cli.main(['check', job])"])
def test_the_command_skips_the_final_garbage_collection_and_a_python_caller_keeps_it(call, tmp_path):
    """`xcm` as a command (``main()`` reads sys.argv) freezes its heap at exit, after its other exit handlers, so
    the interpreter's last garbage collection does not walk the objects of torch, Ray and MLflow; ``main(argv)``
    called from Python leaves the caller's collector alone."""
    done = _python(FROZEN_AT_EXIT.replace("CALL", call), str(TINY_JOB), cwd=tmp_path)
    frozen = int(done.stdout.split("frozen at exit:")[1])
    assert frozen > 100_000 if call == "cli.main()" else frozen == 0, done.stdout


LOADED_MODULES = "import sys; from orchestrator import cli, cluster_jobs; print(*sys.modules, sep='\\n')"


def test_the_cluster_verbs_start_without_torch(tmp_path):
    """`xcm status`, `list`, `logs` and `stop` only talk to a cluster: the command and its cluster verbs load
    without torch and the job checker (about 2 s a call, which a script polling `xcm status` pays each time)."""
    done = _python(LOADED_MODULES, cwd=tmp_path)
    loaded = set(done.stdout.splitlines())
    assert "orchestrator.cluster_jobs" in loaded
    assert not loaded & {"torch", "orchestrator.train.job_checks", "orchestrator.circuit_tasks"}


def _python(code: str, *arguments: str, cwd) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter of this checkout in `cwd`, which must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done

"""The quiet terminal of `xcm run` without Ray: what reaches the terminal and what the log file gets, the lines rank 0
announces, and when Ctrl-C waits for a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from orchestrator import metric_names
from orchestrator.train.announcements import announcement
from orchestrator.train.stopping import StopOnInterrupt
from tests.helpers import ROOT, tiny_spec

WRITERS = """
import logging, os, sys
from pathlib import Path
from orchestrator.console import terminal_session

with terminal_session(verbose=sys.argv[2] == "verbose", log_directory=Path(sys.argv[1])) as console:
    console.say("xcm: hello")
    print("python print", flush=True)
    sys.stderr.write("python stderr\\n")
    os.system("echo child stdout; echo child stderr >&2")
    logging.getLogger("orchestrator.somewhere").warning("a warning for the user")
print("after the session")
"""


def run_writers(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRITERS, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )


def test_quiet_session_sends_every_other_writer_to_the_log_file(tmp_path):
    """Quiet, the terminal gets xcm's lines and its warnings only; Python's prints, stderr and a child process's
    output go to the log file, and the terminal is whole again after the session."""
    done = run_writers(tmp_path, "quiet")
    assert done.stdout == "xcm: hello\nxcm: warning: a warning for the user\nafter the session\n"
    [log_file] = tmp_path.glob("xcm-*.log")  # named by the process until a run's directory takes it
    log = log_file.read_text()
    for line in ("python print", "python stderr", "child stdout", "child stderr", "a warning for the user"):
        assert line in log, line


def test_verbose_session_shows_everything_live(tmp_path):
    """Verbose (--verbose, XCM_VERBOSE=1), every writer reaches the terminal as it did before."""
    done = run_writers(tmp_path, "verbose")
    for line in ("xcm: hello", "python print", "child stdout", "after the session"):
        assert line in done.stdout, line
    assert "python stderr" in done.stderr and "child stderr" in done.stderr


def test_partition_and_circuit_metrics_become_one_line_each():
    """A partition version and a circuits measurement that rank 0's side jobs log become the lines the user
    sees; the per-step metrics do not."""
    partition = {
        metric_names.PARTITION_VERSION: 2,
        metric_names.PARTITION_SECONDS: 1.25,
        metric_names.PARTITION_AGREEMENT: 0.875,
    }
    assert announcement(partition, 29) == (
        "partition v2 in use from step 30 (computed in 1.2 s, agreement with v1 0.88 (ARI))"
    )
    circuits = {
        metric_names.SPECIALIZATION_INDEX: 0.4,
        metric_names.SPECIALIZATION_INDEX_Z: 3.0,
        metric_names.circuit_size("add"): 0.25,
        metric_names.circuit_size("copy"): 0.75,
        metric_names.circuit_size("add", 0.9): 0.1,
    }
    assert announcement(circuits, 59) == (
        "circuits at step 60: specialization index 0.400 (z 3.0); mean circuit size 0.500 over 2 tasks"
    )
    assert announcement({metric_names.LOSS: 1.0, metric_names.TASK_LOSS: 1.0}, 3) is None


@pytest.mark.parametrize(
    ("step", "seconds_per_step", "expected"),
    [(17, 0.5, (19, 1.0)), (5, 0.5, None), (17, None, None), (98, 10.0, None), (96, 1.0, (99, 3.0))],
    ids=["due in 1 s", "due in 7 s: too far", "pace unknown", "last step in 10 s", "last step in 3 s"],
)
def test_ctrl_c_waits_only_for_a_checkpoint_due_within_the_grace(step, seconds_per_step, expected):
    """Ctrl-C waits for the next checkpoint (every 20 steps, and the last of 100) only when it is due within 5 s
    at the pace seen; else it stops at once."""
    display = SimpleNamespace(latest={"step": step}, seconds_per_step=seconds_per_step)
    spec = tiny_spec("training.steps=100", "checkpointing.every_steps=20")
    stopping = StopOnInterrupt(console=None, display=display, spec=spec, run_directory="unused")
    soon = stopping.checkpoint_due_soon()
    assert soon == (pytest.approx(expected) if expected else None)

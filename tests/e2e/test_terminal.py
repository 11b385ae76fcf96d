"""What `xcm run` puts on a user's terminal: xcm's lines and a progress bar, Ray's and DeepSpeed's output in the
run's log file, and a clean stop on Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import NO_MODEL_LOGGING, ROOT, TINY_JOB

WORKER_LINES = ("RayTrainWorker", "TrainController", "Reporting training result", "FutureWarning")


def run_on_terminal(
    *args: str, cwd: Path, timeout: float = 600, interrupt_when: Callable[[str], bool] | None = None
) -> tuple[int, str]:
    """`xcm ARGS...` with a pseudo-terminal of 160 columns as stdin, stdout and stderr, in its own process group as
    a shell's foreground job; ``interrupt_when(screen so far)`` true sends SIGINT to that group once, as Ctrl-C
    does. The exit status and everything written to the terminal."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    os.close(terminal)
    screen, interrupted, deadline = bytearray(), False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: nothing holds the terminal any more
                    break
                screen += chunk
            elif process.poll() is not None:
                break
            if interrupt_when and not interrupted and interrupt_when(screen.decode(errors="replace")):
                os.killpg(process.pid, signal.SIGINT)
                interrupted = True
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        os.close(controller)
    return returncode, screen.decode(errors="replace")


def log_file(screen: str, cwd: Path) -> Path:
    """The log file the run named on the screen."""
    return cwd / re.search(r"log of Ray, DeepSpeed and the workers: (\S+)", screen).group(1)


@pytest.mark.slow
def test_terminal_shows_xcm_lines_and_a_progress_bar_only(tmp_path):
    """On a TTY the screen holds the MLflow link, where the run runs, a live progress bar and the summary, and no
    Ray worker line, controller line or library warning: those are in the log file the screen names."""
    returncode, screen = run_on_terminal(
        "run",
        str(TINY_JOB),
        "--set",
        "training.steps=30",
        "--set",
        "training.report_every=30",
        "--set",
        NO_MODEL_LOGGING,
        cwd=tmp_path,
    )
    assert returncode == 0, screen[-3000:]
    assert "xcm: MLflow run " in screen and "2 workers × 1 CPU (gloo), DeepSpeed ZeRO-2" in screen
    assert re.search(r"\r\x1b\[Kstep 30/30 █+ 100% \| loss ", screen), screen[-2000:]
    assert re.search(r"xcm: run [0-9a-f]{32} finished", screen)
    for noise in WORKER_LINES:
        assert noise not in screen, noise
    log = log_file(screen, tmp_path)
    assert log.parent.name.startswith("tiny-") and "RayTrainWorker" in log.read_text()


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_with_its_checkpoint_and_the_resume_command(tmp_path):
    """Ctrl-C (SIGINT to the process group) during training stops `xcm run` with exit code 130: the run KILLED in
    MLflow, `xcm resume` printed with the newest checkpoint, which verifies; when the next checkpoint was due within
    seconds (every 10 steps here, at the pace seen), the stop waited for it (or a later one) and that is the
    newest."""
    from orchestrator.train import checkpoint_store as store

    returncode, screen = run_on_terminal(
        "run",
        str(TINY_JOB),
        "--set",
        "training.steps=5000",
        "--set",
        "checkpointing.every_steps=10",
        cwd=tmp_path,
        timeout=400,
        interrupt_when=lambda screen: re.search(r"step (1[2-9]|[2-9]\d|\d{3,})/5000", screen) is not None,
    )
    assert returncode == 130, screen[-3000:]
    stopped = re.search(
        r"xcm: stopped; MLflow run ([0-9a-f]{32}) is KILLED; its newest checkpoint is (step-\d+)", screen
    )
    assert stopped, screen[-3000:]
    resume = re.search(r"resume it:  xcm resume (\S+)", screen).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    assert client.get_run(stopped.group(1)).info.status == "KILLED"
    newest = tmp_path / resume / stopped.group(2)
    assert store.problem(*store.resolve(str(newest))[:2]) is None
    awaited = re.search(r"xcm: stopping after the checkpoint at step (\d+)", screen)
    if awaited:
        written = int(re.search(r"xcm: checkpoint at step (\d+) written: stopping", screen).group(1))
        assert written >= int(awaited.group(1)) and newest.name == store.checkpoint_name(written)

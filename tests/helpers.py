"""What many tests share: the repository's paths, the tiny job and model, the `xcm` command, a free port and MLflow
metric histories, a real MLflow server that can be stopped and started again, and the processes of a session.
Fixtures that start something (Ray, an MLflow server) live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = ROOT / "jobs" / "tiny.yaml"


# Logging the trained model costs a finished run 10-20 s (a child process imports MLflow and transformers); the tests
# that run jobs for anything else turn it off with this override.
NO_MODEL_LOGGING = "tracking.log_model=false"


def tiny_spec(*overrides: str, log_model: bool | None = False):
    """jobs/tiny.yaml (GPT-2, 2 layers, width 64, on synthetic text) with ``key=value`` overrides. Its model is not
    logged at the end unless ``log_model`` is True, or None for the job file's own default (logged when it fits)."""
    from orchestrator.train.job_checks import load_spec

    chosen = [] if log_model is None else [f"tracking.log_model={str(log_model).lower()}"]
    return load_spec(TINY_JOB, [*chosen, *overrides])


def tiny_gpt2(vocab_size: int = 64, n_positions: int = 64, **config):
    """A GPT-2 of 2 layers, width 64 and 2 heads, seeded and without dropout, so two calls give the same weights.
    Its MLP matrices are Conv1D, stored [n_in, n_out]: c_fc [64, 256], c_proj [256, 64]."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=vocab_size,
            n_positions=n_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **config,
        )
    )


def run_xcm(
    *args: str,
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`xcm ARGS...` as a user types it, in ``cwd``, with this checkout's code; ``env`` adds to the environment.
    The exit status is the caller's to assert."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        check=False,
    )


def train_mnist_mlp_checkpoint(cwd: Path, timeout: float) -> Path:
    """`xcm run` of the MNIST MLP (width 32) on digits for 40 steps on one worker, with the loss: the run
    directory of a small classifier checkpoint for the verbs that read one (`xcm measure`, `xcm circuits`)."""
    trained = run_xcm(
        "run", str(ROOT / "jobs" / "mnist_mlp.yaml"), "--set", "data.source=digits", "--set", "training.steps=40",
        "--set", "model.config.width=32", "--set", "evaluation.every_steps=0", "--set", "training.report_every=40",
        "--set", "resources.num_workers=1", "--set", "tracking.experiment=train",
        cwd=cwd, timeout=timeout, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run_directory,) = (cwd / "xcm-runs" / "checkpoints").iterdir()
    return run_directory


def free_port() -> int:
    """A port nothing listens on now (whoever is given it binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MetricPoint(NamedTuple):
    """One logged value of a metric; a plain (step, value) tuple to compare with."""

    step: int
    value: float


def metric_history(client, run_id: str, key: str) -> list[MetricPoint]:
    """Every value logged for ``key`` in the run, in step order, read back with MLflow's own client."""
    return sorted(MetricPoint(m.step, m.value) for m in client.get_metric_history(run_id, key))


def metric_values(client, run_id: str, key: str) -> list[float]:
    """The values of :func:`metric_history`, in step order."""
    return [point.value for point in metric_history(client, run_id, key)]


def session_processes(session_id: int) -> list[int]:
    """The live processes of a session (zombies excluded: they are dead, only not yet reaped)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_session(session_id: int, timeout_s: float = 60) -> None:
    """SIGKILL every process of a session until none is left: a driver, its local Ray, and Ray's workers and
    actors, which lead process groups of their own (killing the driver's group alone would not reach them)."""
    deadline = time.monotonic() + timeout_s
    while alive := session_processes(session_id):
        assert time.monotonic() < deadline, f"processes of session {session_id} outlive SIGKILL: {alive}"
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store, that can be stopped and started again."""

    def __init__(self, directory, arguments=(), environment=None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            *arguments,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination",
            str(directory / "artifacts"),
        ]
        self._environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(environment or {})}
        self._log = directory / "server.log"
        self._process = None

    def start(self, timeout_s: float = 180) -> None:
        import urllib.request

        with self._log.open("a") as log:
            self._process = subprocess.Popen(
                self._command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                env=self._environment,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process.poll() is None, self._log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout_s} s")

    def stop(self) -> None:
        """Kill the server and its uvicorn worker (its own process group), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

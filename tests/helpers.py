"""What many tests share: the repository's paths, the tiny job and model, the `xcm` command, a free port and MLflow
metric histories. Fixtures that start something (Ray, an MLflow server) live in conftest.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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

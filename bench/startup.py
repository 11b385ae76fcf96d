"""Benchmark: the fixed start-up and shut-down of one tiny `xcm run`, phase by phase, in two or more checkouts.

    git archive 2c4fef6 | (mkdir -p /tmp/xcm-base && tar -x -C /tmp/xcm-base)   # the baseline, read-only
    python bench/startup.py --checkout base=/tmp/xcm-base --checkout head=. --repeat 3

Each run is `xcm run jobs/tiny.yaml --verbose` (``--steps`` steps, model logging off) as a user types it, in a fresh
directory (a new SQLite store, a new local Ray), with the checkout first on PYTHONPATH. Every output line is stamped
on arrival, and a phase ends at the first line that marks it:

    mlflow     the command started -> the MLflow run exists (imports, spec and data checks, the store)
    ray        -> the local Ray is up
    controller -> Ray Train's controller asks for the workers' resources (the trainer, the actors it starts)
    workers    -> the worker group has started (worker processes, their imports, the process group)
    step 1     -> the first progress line (DeepSpeed, the data, the model, the first partition and steps)
    training   -> the run says it finished (the remaining steps, the checkpoint, the summary)
    exit       -> the command has exited (Ray's shutdown)
    cpu        the CPU seconds of the command and every process under it (Ray's daemons, workers and actors),
               sampled every 0.2 s: what the run costs a machine whose cores are shared, which its wall time hides

The checkouts take turns, run after run, the order reversed every other round, so that a load that swings over
minutes on a shared machine falls on each alike; the table gives each phase's median and its ratio to the first
checkout's. Only ratios between checkouts measured in the same call mean anything on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each phase ends at the first output line that matches its pattern.
PHASES = {
    "mlflow": r"^xcm: MLflow run ",
    "ray": r"^xcm: on a local Ray",
    "controller": r"TrainController.*Requesting resources",
    "workers": r"TrainController.*Started training worker group",
    "step 1": r"^\[xcm [0-9:]+\] step ",
    "training": r"^xcm: run \w+ finished",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, metavar="LABEL=PATH", help="one or more")
    parser.add_argument("--repeat", type=int, default=3, help="runs per checkout")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    checkouts = dict(item.split("=", 1) for item in args.checkout)
    results: dict[str, list[dict[str, float]]] = {label: [] for label in checkouts}
    for round_index in range(args.repeat):
        order = list(checkouts) if round_index % 2 == 0 else list(reversed(checkouts))
        for label in order:
            phases = timed_run(Path(checkouts[label]).resolve(), args.steps)
            if phases is None:
                continue
            results[label].append(phases)
            print(f"round {round_index + 1} {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if not all(results.values()):
        sys.exit("no run of some checkout succeeded: nothing to compare")
    print_table(results)


def timed_run(checkout: Path, steps: int) -> dict[str, float] | None:
    """One `xcm run` of the tiny job from ``checkout``: each phase's seconds, the whole run's as ``total`` and its
    CPU seconds as ``cpu``; None, its output's end printed, when it failed (a machine loaded until Ray's node times
    out at start-up)."""
    command = [
        sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "jobs" / "tiny.yaml"), "--verbose",
        "--set", f"training.steps={steps}", "--set", "tracking.log_model=false",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    environment.setdefault("XCM_CHECKPOINT_KEY", "xcm-bench-checkpoint-key-0123456789abcdef")
    ends: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="xcm-startup-") as directory:
        started = time.monotonic()
        process = subprocess.Popen(
            command, cwd=directory, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        cpu = CpuMeter(process.pid)
        tail = []
        for line in process.stdout:
            tail = [*tail[-40:], line]
            for phase, pattern in PHASES.items():
                if phase not in ends and re.search(pattern, line):
                    ends[phase] = time.monotonic() - started
        process.wait()
        cpu.stop()
        ends["exit"] = time.monotonic() - started
    if process.returncode != 0 or len(ends) != len(PHASES) + 1:
        print(f"the run from {checkout} failed or missed a phase ({sorted(ends)}), left out:\n{''.join(tail[-8:])}")
        return None
    phases, previous = {}, 0.0
    for phase in [*PHASES, "exit"]:
        phases[phase], previous = ends[phase] - previous, ends[phase]
    phases["total"] = ends["exit"]
    phases["cpu"] = cpu.seconds
    return phases


class CpuMeter:
    """The CPU seconds of a process and its descendants, each one's last reading before it ended, read from /proc
    on a thread every 0.2 s (a process that ends between two readings loses at most its last 0.2 s)."""

    def __init__(self, root: int):
        self.root = root
        self.last: dict[int, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    @property
    def seconds(self) -> float:
        return sum(self.last.values())

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.stopped.wait(0.2):
            parents, cpu = {}, {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                pid = int(stat.parent.name)
                parents[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
            for pid, seconds in cpu.items():
                if self._descends(pid, parents):
                    self.last[pid] = seconds

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        while pid > 1:
            if pid == self.root:
                return True
            pid = parents.get(pid, 0)
        return False


def print_table(results: dict[str, list[dict[str, float]]]) -> None:
    labels = list(results)
    medians = {
        label: {phase: statistics.median(run[phase] for run in runs) for phase in runs[0]}
        for label, runs in results.items()
    }
    print(
        f"\n{'phase':<12}"
        + "".join(f"{label:>12}" for label in labels)
        + "".join(f"{label + '/' + labels[0]:>16}" for label in labels[1:])
    )
    for phase in medians[labels[0]]:
        row = f"{phase:<12}" + "".join(f"{medians[label][phase]:>11.1f}s" for label in labels)
        row += "".join(f"{medians[label][phase] / max(medians[labels[0]][phase], 1e-9):>16.2f}" for label in labels[1:])
        print(row)
    print(f"(medians of {', '.join(f'{len(runs)} {label}' for label, runs in results.items())} runs, seconds)")


if __name__ == "__main__":
    main()

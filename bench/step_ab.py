"""Benchmark: the per-step cost of xcm's training loop in two checkouts, interleaved, as CPU time and operator counts.

    git worktree add /tmp/xcm-base fc9fa90              # the baseline, read-only
    python bench/step_ab.py --checkout base=/tmp/xcm-base --checkout head=.
    python bench/step_ab.py --checkout base=/tmp/xcm-base --checkout head=. --lambdas 20 --blocks 20

What ``bench/throughput.py`` cannot tell on a shared machine whose load swings by tens of percent between runs
minutes apart: whether the code of one step got dearer. Each checkout x lambda is one process, one rank, one torch
thread, holding a ``TrainingSession`` of the job (``--job``, default jobs/tiny.yaml) outside Ray: the partitioner's
work is done in-process at the first step (no actors), nothing is restored, and no step is the last, a report or an
evaluation, so every measured step is a steady one (logged every ``tracking.log_every_steps``). The processes run
blocks of ``--size`` steps in turn, never two at once, the order reversed every other block; a step's figure is the
thread's CPU time (``time.thread_time``), which another process's load barely moves, where wall time doubles.
Reported per arm: the median over blocks of the block's mean; per pair of checkouts at one lambda, the median of the
blocks' ratios; then every torch operator whose count over ``--count-steps`` steps differs between the checkouts
(the same counts mean the same device work, syncs and collectives, whatever the timings say).
Each step is ``TrainingSession.run_step``; a checkout from before the side-job interface (fc9fa90 and before) is
driven through its own entry points instead (``maybe_partition`` at the boundary, the old signatures).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, metavar="LABEL=PATH", help="two or more")
    parser.add_argument("--lambdas", default="20,0", help="the loss's lambda per arm (0: the control's path)")
    parser.add_argument("--job", default="jobs/tiny.yaml", help="relative to each checkout")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the first block (the partition)")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--size", type=int, default=30, help="steps per block")
    parser.add_argument("--count-steps", type=int, default=20, help="steps whose operators are counted (0: none)")
    args = parser.parse_args()
    checkouts = dict(item.split("=", 1) for item in args.checkout)
    arms = {
        f"{label}@{lam}": start_worker(str(Path(path).resolve()), lam, args)
        for lam in args.lambdas.split(",")
        for label, path in checkouts.items()
    }
    try:
        for arm in arms.values():
            ask(arm, f"run {args.warmup}")
        blocks: dict[str, list[float]] = {name: [] for name in arms}
        for block in range(args.blocks):
            for name in list(arms) if block % 2 == 0 else list(arms)[::-1]:
                blocks[name].append(statistics.fmean(ask(arms[name], f"run {args.size}")))
        counts = {name: ask(arm, f"count {args.count_steps}") for name, arm in arms.items()} if args.count_steps else {}
    finally:
        for arm in arms.values():
            arm.stdin.close()
    report(blocks, counts, list(checkouts), args.lambdas.split(","))


def start_worker(checkout: str, lam: str, args) -> subprocess.Popen:
    """One arm's process; returns once its session is built."""
    with socket.socket() as probe:  # a port for its one-rank process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="xcm-step-ab-")
    command = [sys.executable, __file__, "--worker", checkout, str(port), lam, workdir, args.job, *args.overrides]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=workdir)
    ask(process, None)
    return process


def ask(process: subprocess.Popen, command: str | None):
    """Send `command` (None: only wait for the greeting) and return the JSON line that answers it."""
    if command is not None:
        process.stdin.write(command + "\n")
        process.stdin.flush()
    for line in process.stdout:
        if line.startswith("@"):
            return json.loads(line[1:])
    raise SystemExit(f"a benchmark worker exited (code {process.wait()}); its errors are above")


def report(blocks: dict[str, list[float]], counts: dict[str, dict], labels: list[str], lambdas: list[str]) -> None:
    print(f"\nCPU time per step, median over {len(next(iter(blocks.values())))} interleaved blocks:")
    for name, means in blocks.items():
        each = ", ".join(f"{mean * 1000:.1f}" for mean in means)
        print(f"  {name:24s} {statistics.median(means) * 1000:7.2f} ms   ({each})")
    base = labels[0]
    for lam in lambdas:
        for label in labels[1:]:
            reference, other = blocks[f"{base}@{lam}"], blocks[f"{label}@{lam}"]
            ratios = [b / a for a, b in zip(reference, other, strict=True)]
            print(
                f"  {label} / {base} at lambda {lam}: {statistics.median(ratios):.3f} "
                f"(blocks {min(ratios):.3f}..{max(ratios):.3f})"
            )
            if counts:
                print_count_differences(counts[f"{base}@{lam}"], counts[f"{label}@{lam}"])


def print_count_differences(reference: dict[str, int], other: dict[str, int]) -> None:
    differing = sorted(name for name in reference.keys() | other.keys() if reference.get(name) != other.get(name))
    total = sum(reference.values()), sum(other.values())
    print(f"    torch operators: {total[0]} and {total[1]}; {len(differing)} kinds differ in count")
    for name in differing:
        print(f"      {name:48s} {reference.get(name, 0):8d} {other.get(name, 0):8d}")


def worker(checkout: str, port: str, lam: str, workdir: str, job: str, overrides: list[str]) -> None:
    """One rank of the job in `checkout`'s code; answers "run N" (each step's CPU seconds), "count N" (torch
    operators by name over N steps), until stdin closes."""
    sys.path.insert(0, checkout)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    import deepspeed
    import torch

    import orchestrator

    if not orchestrator.__file__.startswith(checkout):
        raise SystemExit(f"imported {orchestrator.__file__}, not {checkout}'s orchestrator")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    session, step_once = build_session(checkout, lam, workdir, job, overrides)
    step = 0

    def run(count: int) -> list[float]:
        nonlocal step
        seconds = []
        for _ in range(count):
            started = time.thread_time()
            step_once(session, step)
            seconds.append(time.thread_time() - started)
            step += 1
        return seconds

    print("@null", flush=True)
    for line in sys.stdin:
        verb, count = line.split()
        if verb == "run":
            print("@" + json.dumps(run(int(count))), flush=True)
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as profiled:
                run(int(count))
            print("@" + json.dumps({event.key: event.count for event in profiled.key_averages()}), flush=True)
    session.close()


def build_session(checkout: str, lam: str, workdir: str, job: str, overrides: list[str]):
    """The checkout's TrainingSession with a local partitioner and nothing to restore, and its loop body."""
    from mlflow import MlflowClient

    side_jobs = (Path(checkout) / "orchestrator" / "side_jobs.py").exists()
    if side_jobs:
        import orchestrator.partitioning.schedule as schedule
        from orchestrator.partitioning.actor import PartitionShare
        from orchestrator.train.job_checks import load_spec
    else:  # fc9fa90 and before
        import orchestrator.train.partition_schedule as schedule
        from orchestrator.partitioner import PartitionShare
        from orchestrator.spec import load_spec
    from orchestrator.modularity import partition_group
    from orchestrator.train import checkpointing
    from orchestrator.train.worker import TrainingSession

    never = 1_000_000  # no step is the last, a report, a checkpoint or an evaluation
    steady = [
        f"training.steps={never}",
        f"training.report_every={never}",
        "resources.num_workers=1",
        "evaluation.every_steps=0",
        "checkpointing.every_steps=0",
        "modularity.partition_at_step=0",
        "tracking.log_every_steps=10",
    ]
    spec = load_spec(Path(checkout) / job, [*steady, *overrides, f"modularity.lambda={lam}"]).resolved(Path(workdir))

    class LocalPool:
        """The partitioner actors' work, done here when asked."""

        def __init__(self, names, group_names):
            self.shares = []

        def request(self, snapshot, previous, draw):
            modularity = spec.modularity
            partitions = {
                name: partition_group(*group.tensors(), modularity.k, modularity.partition, modularity.seed).to_dict()
                for name, group in snapshot.items()
            }
            self.shares = [PartitionShare(partitions, {}, 0.0)]

        def ready(self, request):
            return True

        def collect(self, request):
            return self.shares

    schedule.PartitionerPool = LocalPool
    checkpointing.CheckpointManager.restore = lambda self, *args, **kwargs: None
    client = MlflowClient(spec.tracking.uri)
    run_id = client.create_run(client.create_experiment(f"step-ab-{os.getpid()}")).info.run_id
    if not side_jobs:
        return TrainingSession(spec, 0, 1, run_id, None), step_before_side_jobs
    if not hasattr(TrainingSession, "run_step"):
        raise SystemExit(
            f"{checkout}: a TrainingSession with side jobs but no run_step; compare commits from the "
            "one that added run_step, or fc9fa90 and before"
        )
    from orchestrator.ranks import Rank

    return TrainingSession(spec, Rank(0, 1), run_id, None), TrainingSession.run_step


def step_before_side_jobs(session, step: int) -> None:
    """The body of ``TrainingSession.run`` before the side-job interface (fc9fa90 and before)."""
    session.maybe_partition(step)
    metrics = session.train_step(measure=session.metrics_due(step))
    metrics.update(session.throughput.memory_metrics(step))
    session.publish(step, metrics)
    session.maybe_evaluate(step)
    session.maybe_report(step, metrics)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:7], overrides=sys.argv[7:])
    else:
        main()

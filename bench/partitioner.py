"""Benchmark: training step time while the partitioner actors compute, against step time while they are idle.

    python bench/partitioner.py                     # 4-layer GPT-2 of width 256
    python bench/partitioner.py --set partitioner.cpus=1 --set model.config.n_layer=8

One job (2 workers, ZeRO-2) recomputes its partition every ``--every`` steps. The steps strictly between a
request and its adoption ran while a partitioner was busy; the others (past a warm-up) while it was idle. A
step's wall time is the gap between rank 0's consecutive per-step metric timestamps, so it includes the
partition bookkeeping at step boundaries (the request's gather and put, the adoption's broadcast), not only
``train_step``; those two kinds of step are reported on their own. Prints the medians and their ratios.
On a machine with fewer cores than trainers + partitioner (the default ``partitioner.cpus: 0``), the actor
takes CPU time from the trainers: the ratio shows that cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5
WIDER_MODEL = ["model.config.n_embd=256", "model.config.n_layer=4", "model.config.n_head=4"]


def step_classes(client: MlflowClient, run_id: str, steps: int) -> dict[str, list[float]]:
    """Wall seconds of each step, grouped as idle, busy (a version in flight), request and adoption steps."""
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, metric_names.LOSS)}
    lags = {m.step: int(m.value) for m in client.get_metric_history(run_id, metric_names.PARTITION_LAG_STEPS)}
    requests = {adopted - lag for adopted, lag in lags.items()}
    busy = {step for adopted, lag in lags.items() for step in range(adopted - lag + 1, adopted)}
    classes: dict[str, list[float]] = {"idle": [], "busy": [], "request": [], "adoption": []}
    for step in range(WARMUP_STEPS, steps - 1):  # the last step also checkpoints and draws the final heatmaps
        seconds = (stamps[step] - stamps[step - 1]) / 1000
        kind = "request" if step in requests else "adoption" if step in lags else "busy" if step in busy else "idle"
        classes[kind].append(seconds)
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--every", type=int, default=8, help="steps between partition requests")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more spec overrides (repeatable)",
    )
    args = parser.parse_args()
    spec = load_spec(
        ROOT / "jobs" / "tiny.yaml",
        [
            f"training.steps={args.steps}",
            f"training.report_every={args.steps}",
            "evaluation.every_steps=0",
            f"modularity.partition_every={args.every}",
            "partitioner.heatmap_every=1000000",
            *WIDER_MODEL,
            *args.overrides,
        ],
    )
    with tempfile.TemporaryDirectory(prefix="xcm-bench-") as workdir:
        result = run_job(spec, Path(workdir))
        client = MlflowClient(tracking_uri=result.tracking_uri)
        classes = step_classes(client, result.run_id, args.steps)
        seconds = [m.value for m in client.get_metric_history(result.run_id, metric_names.PARTITION_SECONDS)]
    idle = statistics.median(classes["idle"])
    print(
        f"\npartitioner: {spec.partitioner.actors} actor(s), {spec.partitioner.cpus} CPUs reserved; "
        f"a version takes {statistics.median(seconds):.2f} s to compute (median of {len(seconds)})"
    )
    print(f"{'steps':<10}{'count':>7}{'median s':>11}{'vs idle':>9}")
    for kind, values in classes.items():
        if values:
            median = statistics.median(values)
            print(f"{kind:<10}{len(values):>7}{median:>11.3f}{median / idle:>9.2f}")
    if classes["busy"]:
        print(f"\nstep time with the partitioner busy / idle: {statistics.median(classes['busy']) / idle:.2f}")


if __name__ == "__main__":
    main()

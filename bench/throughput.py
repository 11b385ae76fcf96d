"""Benchmark: xcm's trainer against a plain DeepSpeed loop, tokens/s as a ratio, with the clusterability loss off and on.

    python bench/throughput.py                          # jobs/tiny.yaml: tiny GPT-2, ZeRO-2, fp32, 2 CPU workers
    python bench/throughput.py --set deepspeed.zero_stage=3 --steps 80
    python bench/throughput.py --set model.size=small --set training.precision=bf16 \
        --set resources.gpus_per_worker=1 --workers 1     # GPT-2 124M, ZeRO-2, bf16 on one GPU

All three runs share the job's model, ZeRO stage, batch, precision and data:
- plain: ``deepspeed.initialize`` and forward / cross-entropy / backward / step in worker processes started by
  torch.multiprocessing (gloo on CPU, nccl on GPU): no Ray, no MLflow, no clusterability loss;
- xcm, loss off and loss on: the job through ``run_job`` (Ray Train workers, MLflow, the partitioner, progress).
Only steady state counts: a step's time is the gap between consecutive steps (for xcm, between the timestamps of
its per-step MLflow metrics, so logging and every per-step side job are inside), the first ``--skip`` steps and
the last are dropped (start-up, partitioning, the final checkpoint), and the median is taken. The target is a
ratio of 0.95 or more with the loss on.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.spec import JobSpec, load_spec  # noqa: E402


def plain_worker(rank: int, world_size: int, port: int, spec_json: dict, output: str) -> None:
    """One rank of the plain DeepSpeed loop; rank 0 writes the step times."""
    spec = JobSpec.model_validate(spec_json)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cuda" if spec.resources.use_gpu else "cpu")
    import deepspeed

    from orchestrator.data import batch_stream, build_training_data
    from orchestrator.models import build_model
    from orchestrator.train.deepspeed_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="nccl" if spec.resources.use_gpu else "gloo")
    # Ray gives each worker as many threads as CPUs (OMP_NUM_THREADS); the plain loop gets the same share.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    training = spec.training
    data = build_training_data(spec.data, spec.model)
    model = build_model(spec.model, data.vocab_size, seed=training.seed)
    optimizer = None if spec.resources.use_gpu else torch.optim.AdamW(
        model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec, world_size))
    batches = batch_stream(data.train, training.micro_batch_size, rank, world_size, training.seed)
    stamps = []
    for _ in range(training.steps):
        for _ in range(training.gradient_accumulation_steps):
            batch = next(batches)
            input_ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
            logits = engine(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            engine.backward(loss)
            engine.step()
        loss.item()  # a real loop reads its loss; on GPU this also waits for the step to finish
        stamps.append(time.perf_counter())
    if rank == 0:
        torch.save(stamps, output)


def plain_step_seconds(spec: JobSpec, workers: int) -> list[float]:
    with socket.socket() as probe:  # a free port for the process group, released before the workers bind it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        output = str(Path(directory) / "stamps.pt")
        torch.multiprocessing.spawn(plain_worker, args=(workers, port, spec.model_dump(mode="json", by_alias=True),
                                                        output), nprocs=workers)
        return gaps(torch.load(output))


def xcm_step_seconds(spec: JobSpec, workdir: Path) -> list[float]:
    """The job through xcm's trainer; step times from the timestamps of its per-step ``loss`` metric."""
    from mlflow import MlflowClient

    from orchestrator.train.launch import run_job

    result = run_job(spec, workdir)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    inside = [metric.value for metric in client.get_metric_history(result.run_id, "step_time_s")]
    print(f"xcm: median step_time_s inside train_step {statistics.median(inside) * 1000:.1f} ms")
    history = client.get_metric_history(result.run_id, "loss")
    return gaps([metric.timestamp / 1000 for metric in sorted(history, key=lambda metric: metric.step)])


def gaps(stamps: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def steady_median(step_seconds: list[float], skip: int) -> float:
    return statistics.median(step_seconds[skip:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="start-up steps left out of the median")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lambda", dest="lam", type=float, default=20.0, help="the loss-on run's lambda")
    args = parser.parse_args()
    base = [*args.overrides, f"training.steps={args.steps}", f"training.report_every={args.steps}",
            f"resources.num_workers={args.workers}", "evaluation.every_steps=0", "checkpointing.every_steps=0",
            "modularity.partition_at_step=0"]
    # The plain loop runs first and last: on a shared machine the load drifts, and its two medians show how much.
    runs = [("plain DeepSpeed", 0.0), ("xcm, loss off", 0.0), ("xcm, loss on", args.lam), ("plain DeepSpeed", 0.0)]
    medians: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for index, (name, lam) in enumerate(runs):
            spec = load_spec(args.job, [*base, f"name=bench-{index}", f"modularity.lambda={lam}"])
            spec = spec.resolved(Path(directory))
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.resources.use_gpu else "cpu")
            step_seconds = (plain_step_seconds(spec, args.workers) if name == "plain DeepSpeed"
                            else xcm_step_seconds(spec, Path(directory)))
            medians.setdefault(name, []).append(steady_median(step_seconds, args.skip))
    training = spec.training
    tokens = training.micro_batch_size * training.gradient_accumulation_steps * args.workers * spec.data.block_size
    print(f"\n{spec.model.family}-{spec.model.size}, ZeRO-{spec.deepspeed.zero_stage}, {training.precision}, "
          f"{args.workers} workers, {tokens} tokens per step; median of steps {args.skip}..{args.steps - 2}")
    plain = statistics.mean(medians["plain DeepSpeed"])
    print("  plain DeepSpeed, first and last run: "
          + ", ".join(f"{seconds * 1000:.1f} ms/step" for seconds in medians["plain DeepSpeed"]))
    for name, values in medians.items():
        seconds = statistics.mean(values)
        print(f"  {name:16s} {seconds * 1000:8.1f} ms/step  {tokens / seconds:10,.0f} tokens/s  "
              f"ratio {plain / seconds:.3f}")


if __name__ == "__main__":
    main()

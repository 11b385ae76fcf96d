"""Benchmark: xcm's trainer against a plain DeepSpeed loop, tokens/s as a ratio, with the clusterability loss off
and on.

    python bench/throughput.py                          # jobs/tiny.yaml: tiny GPT-2, ZeRO-2, fp32, 2 CPU workers
    python bench/throughput.py --set deepspeed.zero_stage=3 --rounds 3
    python bench/throughput.py --set model.size=small --set training.precision=bf16 \
        --set resources.gpus_per_worker=1 --workers 1 \
        --set data.block_size=512 --set training.micro_batch_size=16 \
        --steps 300 --skip 100                           # GPT-2 124M, ZeRO-2, bf16 on one GPU, 8k tokens a step
    python bench/throughput.py --variants plain,xcm-on   # only these runs, in this order

Every run shares the job's model, ZeRO stage, batch, precision and data:
- plain DeepSpeed: ``deepspeed.initialize`` and forward / cross-entropy / backward / step in worker processes
  started by torch.multiprocessing (gloo on CPU, nccl on GPU), with no Ray running: no Ray, no MLflow, no loss;
- plain DeepSpeed on Ray Train: the same loop in Ray Train workers, started as xcm starts its own (a local Ray
  whose workers run at niceness 0: see ``orchestrator.priority``). Its ratio to the plain loop is what Ray
  itself costs on this machine: Ray's daemons and Ray Train's helper actors (~20 processes) wake every few ms;
  on 2-core machines they took 5-20% of one core between them (two machines; idle, and while training);
- xcm, loss off and loss on: the job through ``run_job`` (Ray Train workers, MLflow, the partitioner, progress).
Two runs without Ray, MLflow or the datasets library, for a bare GPU machine (``bench/gpu.sh``; not in the
default set): xcm's engine and clusterability loss (contiguous partition, ``training.compile`` honoured) in the
plain loop's processes, and a compiled plain PyTorch loop in one process (the hand-tuned anchor). The report
adds each run's ratio to that anchor and its MFU; GPU runs print their peak memory.
Ray is shut down after each Ray run, so every run starts from the same quiet machine. The runs go in rounds
(``--rounds``), each round all four in turn (or those ``--variants`` names, in its order), every second round in
the reverse order, so that a load that drifts over minutes touches every variant alike.
A run's figure is its mean step time over steps ``--skip``.. the second last (start-up, partitioning and the
final checkpoint left out; on a 2-core CPU, a window that starts 150 steps (3 s) in still held Ray's start-up
and put the plain loop on Ray Train at 0.94 of the plain loop, one that starts 500 steps in at 1.0, hence the
defaults): for xcm, from the timestamps of its MLflow ``loss`` metric (at the steps it logs:
``tracking.log_every_steps``), so logging and every per-step side job are inside. Ratios are taken within a
round and the median over rounds reported. The target is a ratio of 0.95 or more with the loss on. On a small
CPU machine, log every 10 steps or so (``--set tracking.log_every_steps=10``): each logged step costs rank 0 a
little, which a GPU step hides and a 40 ms CPU step does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import metric_names  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402
from orchestrator.train.job_checks import load_spec  # noqa: E402


def plain_loop(spec: JobSpec, rank: int, world_size: int) -> dict[int, float]:
    """Train the job's model without xcm; the time at the end of each step."""
    import deepspeed

    from orchestrator.data import batch_stream, build_training_data
    from orchestrator.models import build_model
    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.engine import client_optimizer

    training = spec.training
    data = build_training_data(spec.data, spec.model)
    model = build_model(spec.model, data.vocab_size, seed=training.seed)
    lam = spec.modularity.lambda_
    if lam > 0:  # xcm's step without Ray or MLflow: its engine (compiled where the job says) and loss
        from orchestrator.train.engine import build_engine

        engine = build_engine(model, spec, world_size)
        regulariser = contiguous_regulariser(engine.module, spec)
    else:
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=client_optimizer(model, spec), config=deepspeed_config(spec, world_size)
        )
    batches = batch_stream(data.train, training.micro_batch_size, rank, world_size, training.seed)
    stamps = {}
    for step in range(training.steps):
        for _ in range(training.gradient_accumulation_steps):
            batch = next(batches)
            input_ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
            if lam > 0:
                regulariser.clear()
            logits = engine(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            if lam > 0:
                loss = loss + regulariser.penalty(lam)
            engine.backward(loss)
            engine.step()
        loss.item()  # a real loop reads its loss; on GPU this also waits for the step to finish
        stamps[step] = time.perf_counter()
    if rank == 0 and engine.device.type == "cuda":
        print(f"[bench]   plain loop peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    return stamps


def contiguous_regulariser(model: torch.nn.Module, spec: JobSpec):
    """xcm's differentiable clusterability loss on the job's matrices under the contiguous partition (costs the
    same as the spectral one, which needs the partitioner's actors)."""
    from orchestrator.modularity import (
        ClusterabilityRegulariser,
        find_matrix_groups,
        partition_group,
        regularise_groups,
    )

    groups = find_matrix_groups(model, spec.modularity.matrices)
    regulariser = ClusterabilityRegulariser(weights_persist=spec.deepspeed.zero_stage < 3)
    partitions = {
        group.name: partition_group(
            [matrix.weight() for matrix in group.inputs],
            [matrix.weight() for matrix in group.outputs],
            spec.modularity.k,
            method="contiguous",
        )
        for group in groups
    }
    regularise_groups(regulariser, groups, partitions)
    return regulariser


def compiled_torch_stamps(spec: JobSpec, workdir: Path) -> dict[int, float]:
    """The hand-tuned anchor: the same model and tokens a step in one process, no DeepSpeed, no Ray, no loss:
    ``torch.compile``, fused AdamW on GPU, bf16 autocast over fp32 weights where the job is bf16 (nanoGPT's
    recipe). One device: every worker's micro-batch goes into its one micro-batch."""
    from orchestrator.data import batch_stream, build_training_data
    from orchestrator.models import build_model
    from orchestrator.train.objectives import to_device

    training = spec.training
    device = torch.device("cuda" if spec.resources.use_gpu else "cpu")
    data = build_training_data(spec.data, spec.model)
    model = build_model(spec.model, data.vocab_size, seed=training.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, fused=device.type == "cuda")
    compiled = torch.compile(model)
    rows = training.micro_batch_size * spec.resources.num_workers
    batches = batch_stream(data.train, rows, 0, 1, training.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=training.precision == "bf16")
    stamps = {}
    for step in range(training.steps):
        for _ in range(training.gradient_accumulation_steps):
            batch = next(batches)
            input_ids, labels = to_device(batch["input_ids"], device), to_device(batch["labels"], device)
            with autocast:
                logits = compiled(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            (loss / training.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        stamps[step] = time.perf_counter()
    if device.type == "cuda":
        print(f"[bench]   compiled loop peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    return stamps


def multiprocessing_worker(rank: int, world_size: int, port: int, spec_json: dict, output: str) -> None:
    """One rank of the plain loop without Ray; rank 0 writes the step times."""
    spec = JobSpec.model_validate(spec_json)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cuda" if spec.resources.use_gpu else "cpu",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if spec.resources.use_gpu else "gloo")
    # Ray gives each worker as many threads as CPUs (OMP_NUM_THREADS); the plain loop gets the same share.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    stamps = plain_loop(spec, rank, world_size)
    if rank == 0:
        torch.save(stamps, output)
    # a rank that exits with its process group alive can abort in the communicator's threads (seen once in 12
    # runs: "terminate called without an active exception", SIGABRT), failing the whole benchmark
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def ray_train_worker(config: dict) -> None:
    """One rank of the plain loop on Ray Train (which has set up the process group); rank 0 writes the times."""
    import ray.train

    context = ray.train.get_context()
    stamps = plain_loop(JobSpec.model_validate(config["spec"]), context.get_world_rank(), context.get_world_size())
    if context.get_world_rank() == 0:
        torch.save(stamps, config["output"])


def plain_stamps(spec: JobSpec, workdir: Path) -> dict[int, float]:
    from orchestrator.train.launch import free_port

    port = free_port()  # for the process group, released before the workers bind it
    output = str(workdir / "stamps.pt")
    torch.multiprocessing.spawn(
        multiprocessing_worker,
        args=(spec.resources.num_workers, port, spec_json(spec), output),
        nprocs=spec.resources.num_workers,
    )
    return torch.load(output)


def plain_on_ray_train_stamps(spec: JobSpec, workdir: Path) -> dict[int, float]:
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train.launch import ensure_ray, worker_group

    ensure_ray(spec)
    output = str(workdir / "stamps.pt")
    try:
        TorchTrainer(
            ray_train_worker,
            train_loop_config={"spec": spec_json(spec), "output": output},
            **worker_group(spec),
            run_config=RunConfig(name=spec.name, storage_path=str(workdir)),
        ).fit()
    finally:
        ray.shutdown()
    return torch.load(output)


def xcm_stamps(spec: JobSpec, workdir: Path) -> dict[int, float]:
    """The job through xcm's trainer; the timestamps of its ``loss`` metric, by step."""
    import ray
    from mlflow import MlflowClient

    from orchestrator.train.launch import run_job

    try:
        result = run_job(spec, workdir)
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    print(
        f"[bench]   xcm's own figures at the last logged step: {logged.get(metric_names.MFU, 0):.3f} MFU, "
        f"{logged.get(metric_names.TOKENS_PER_SECOND, 0):,.0f} tokens/s, "
        f"peak memory {logged.get(metric_names.PEAK_MEMORY_MAX, 0):.2f} GiB, "
        f"C {logged.get(metric_names.CLUSTERABILITY, 0):.3f}",
        flush=True,
    )
    history = client.get_metric_history(result.run_id, metric_names.LOSS)
    return {metric.step: metric.timestamp / 1000 for metric in history}


def spec_json(spec: JobSpec) -> dict:
    return spec.model_dump(mode="json", by_alias=True)


def steady_step_seconds(stamps: dict[int, float], skip: int) -> float:
    """Mean step time from the end of step ``skip`` (or the first logged step after it) to the end of the second
    last logged step (the last one saves a checkpoint). A mean of the whole window rather than a median of gaps:
    MLflow's timestamps are whole milliseconds, which would round a median, and every slow step is a real cost."""
    steps = sorted(step for step in stamps if step >= skip)[:-1]
    return (stamps[steps[-1]] - stamps[steps[0]]) / (steps[-1] - steps[0])


# key: (name, the function that runs it and returns its step-end times by step, whether the clusterability loss is on)
VARIANTS = {
    "plain": ("plain DeepSpeed", plain_stamps, False),
    "plain-ray-train": ("plain DeepSpeed on Ray Train", plain_on_ray_train_stamps, False),
    "plain-loss-on": ("xcm's engine and loss, no Ray", plain_stamps, True),
    "xcm-off": ("xcm, loss off", xcm_stamps, False),
    "xcm-on": ("xcm, loss on", xcm_stamps, True),
    "compiled-torch": ("compiled plain PyTorch", compiled_torch_stamps, False),
}
PLAIN, ON_RAY_TRAIN = VARIANTS["plain"][0], VARIANTS["plain-ray-train"][0]
COMPILED = VARIANTS["compiled-torch"][0]
GPU_BENCH_ONLY = {"compiled-torch", "plain-loss-on"}  # the Ray-free runs bench/gpu.sh needs (its CPU compile is slow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument(
        "--skip", type=int, default=400, help="start-up steps left out (imports, the partition and its heatmaps)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, interleaved")
    parser.add_argument("--lambda", dest="lam", type=float, default=20.0, help="the loss-on run's lambda")
    parser.add_argument(
        "--variants",
        default=",".join(key for key in VARIANTS if key not in GPU_BENCH_ONLY),
        help=f"which runs, in this order each round (default: all but {', '.join(sorted(GPU_BENCH_ONLY))}; "
        f"{','.join(VARIANTS)})",
    )
    args = parser.parse_args()
    if not 0 <= args.skip < args.steps - 3:
        parser.error(f"--skip {args.skip} leaves no steady steps out of --steps {args.steps}")
    chosen = args.variants.split(",")
    if unknown := [key for key in chosen if key not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    base = [
        *args.overrides,
        f"training.steps={args.steps}",
        f"training.report_every={args.steps}",
        f"resources.num_workers={args.workers}",
        "evaluation.every_steps=0",
        "checkpointing.every_steps=0",
        "modularity.partition_at_step=0",
    ]
    seconds: dict[str, list[float]] = {VARIANTS[key][0]: [] for key in chosen}
    with tempfile.TemporaryDirectory() as directory:
        for round_index in range(args.rounds):
            order = chosen if round_index % 2 == 0 else chosen[::-1]  # drift within a round cancels over two
            for variant_index, (name, run, loss_on) in enumerate(VARIANTS[key] for key in order):
                workdir = Path(directory) / f"{round_index}-{variant_index}"
                workdir.mkdir()
                spec = load_spec(
                    args.job,
                    [
                        *base,
                        f"name=bench-{round_index}-{variant_index}",
                        f"modularity.lambda={args.lam if loss_on else 0.0}",
                    ],
                ).resolved(workdir)
                os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.resources.use_gpu else "cpu")
                stamps = run(spec, workdir)
                seconds[name].append(steady_step_seconds(stamps, args.skip))
                print(
                    f"[bench] round {round_index + 1}/{args.rounds} {name}: {seconds[name][-1] * 1000:.1f} ms/step",
                    flush=True,
                )
    report(spec, args, seconds)


def report(spec: JobSpec, args, seconds: dict[str, list[float]]) -> None:
    """Each variant's median over the rounds, and its ratio to the plain loop of the same round: this machine's
    speed drifts by more than the differences measured, and a round's runs are minutes apart, not tens of them."""
    training = spec.training
    tokens = training.micro_batch_size * training.gradient_accumulation_steps * args.workers * spec.data.block_size
    typical = {name: statistics.median(values) for name, values in seconds.items()}
    plain, on_ray, compiled = seconds.get(PLAIN), seconds.get(ON_RAY_TRAIN), seconds.get(COMPILED)
    flops_per_token, peak = model_flops_per_token(spec), worker_peak_flops(spec)
    print(
        f"\n{spec.model.family}-{spec.model.size}, ZeRO-{spec.deepspeed.zero_stage}, {training.precision}, "
        f"{args.workers} workers, {tokens:,} tokens per step; mean of steps {args.skip}..{args.steps - 2}, "
        f"median of {args.rounds} rounds"
    )
    print(
        f"  {'':30s} {'ms/step':>8s}  {'(each round)':24s} {'tokens/s':>10s}  {'vs plain':>8s}  "
        f"{'vs plain on Ray Train':>21s}  {'vs compiled':>11s}  {'MFU':>5s}   (ratios: median of the rounds' own)"
    )
    for name, values in seconds.items():
        rounds = ", ".join(f"{value * 1000:.1f}" for value in values)
        print(
            f"  {name:30s} {typical[name] * 1000:8.1f}  ({rounds:22s}) {tokens / typical[name]:10,.0f}  "
            f"{_paired(plain, values):8.3f}  {_paired(on_ray, values):21.3f}  {_paired(compiled, values):11.3f}  "
            f"{tokens / typical[name] * flops_per_token / (peak * args.workers) if peak else float('nan'):5.3f}"
        )


def model_flops_per_token(spec: JobSpec) -> float:
    """Training FLOPs per token of the job's model, counted as xcm counts them for its MFU metric."""
    from orchestrator.data import build_training_data
    from orchestrator.models import build_model
    from orchestrator.train.throughput import flops_per_item

    data = build_training_data(spec.data, spec.model)
    model = build_model(spec.model, data.vocab_size, seed=0)
    return flops_per_item(model, {"input_ids": data.train[:1, :-1]}, items=data.train.shape[1] - 1)


def worker_peak_flops(spec: JobSpec) -> float | None:
    """One worker's peak FLOP/s at the job's precision (None for a GPU xcm has no figure for: no MFU shown)."""
    from orchestrator.train.throughput import peak_flops

    device = torch.device("cuda" if spec.resources.use_gpu else "cpu")
    return peak_flops(spec.resources, spec.training.precision, device)


def _paired(reference: list[float] | None, values: list[float]) -> float:
    """Median over the rounds of reference step time / step time (throughput relative to the reference); NaN
    where the reference did not run."""
    if not reference:
        return float("nan")
    return statistics.median(base / value for base, value in zip(reference, values, strict=True))


if __name__ == "__main__":
    main()

"""Benchmark: the circuit finders at the papers' sizes, timed on this machine.

    python bench/circuits.py              # all three parts
    python bench/circuits.py --quick      # GPT-2 attribution with K=2 steps on 2x32 tokens

1. Exact greedy finder on the MNIST MLP (784-64-64-64-10, trained for a few seconds on scikit-learn's digits
   resized to 28x28), one label: the whole model with incremental evaluation, and fc2 and fc1 alone side by
   side with the naive loop (one full float64 forward of the model per weight, on the first weights of the
   same visiting order), per weight; the same for the CIFAR CNN's fc3, where every naive forward runs the conv.
2. Attribution on GPT-2 124M shapes (random init, its 24 MLP matrices = 56.6 M weights in scope): integrated
   gradients (K steps) and the faithfulness grid with bisection, CPU wall time and peak resident memory. The
   task is the model's own next-token prediction (a random model has no other), so only the timing means anything.
3. Agreement of the two finders on a small digits MLP (64-32-10): sizes and Jaccard overlap of their circuits.
4. The circuits actor's measurement, as the side job runs it (``CircuitsActor.compute``, method all, under a fresh
   spectral partition, one torch thread as with circuits.cpus 0), each in a fresh process so that its peak
   resident memory is the measurement's own: the MNIST MLP job on digits (trained 300 full-batch steps), the tiny
   GPT-2 job (trained 20 steps), and GPT-2 124M shapes (random init, byte vocabulary) on the synthetic tasks.

5. Rank 0's side of the circuits side job's gather (``gather_parameters``) on GPT-2 124M shapes: peak allocated
   memory and time of the whole-model copy and of the gather streamed into Ray's object store one parameter at a
   time, and whether both give the same weights.

    python bench/circuits.py --part actor   # one part only
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchestrator.circuits import attribution_weight_circuit, greedy_weight_circuit
from orchestrator.circuits.chain_state import ChainState
from orchestrator.data.images import digits, to_shape
from orchestrator.models.vision import CifarCNN, MnistMLP

LABEL = 3
ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_TASKS = "circuits.tasks=['synthetic:add,count']"  # the tasks a few training steps make use the MLP
ACTOR_JOBS = (  # what, job file, overrides, training steps before the measurement
    ("tiny GPT-2 job", "tiny.yaml", (SYNTHETIC_TASKS, "circuits.max_examples=200"), 20),
    (
        "GPT-2 124M shapes",
        "tiny.yaml",
        (
            "model.size=small",
            SYNTHETIC_TASKS,
            "circuits.max_examples=16",
            "circuits.ig_steps=2",
            "circuits.null_draws=2",
        ),
        0,
    ),
    (
        "MNIST MLP job on digits",
        "mnist_mlp.yaml",
        ("data.source=digits", "circuits.tasks=['labels:0+1+2+3+4,5+6+7+8+9']", "circuits.max_examples=200"),
        300,
    ),
)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def trained(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float) -> nn.Module:
    """Full-batch Adam for `steps` steps: seconds, enough for a model that has learnt the digits."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def naive_greedy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, name: str, limit: int) -> torch.Tensor:
    """The definition, run as written on the first `limit` weights of `name` (row-major): zero each in turn,
    one full float64 forward of the model each, and keep it zeroed unless the loss rises above the current
    loss. Returns the flat keep mask of those weights."""
    model = model.double().requires_grad_(False)
    weight = dict(model.named_parameters())[name]
    inputs, target_array = inputs.double(), targets.numpy()

    def loss() -> float:
        with torch.no_grad():
            return float(ChainState.score(model(inputs).numpy(), target_array)[0].mean())

    current = loss()
    for unit, source in list(np.ndindex(*weight.shape))[:limit]:
        value = float(weight[unit, source])
        if value == 0:
            continue
        weight[unit, source] = 0.0
        trial = loss()
        if trial > current:
            weight[unit, source] = value
        else:
            current = trial
    return (weight != 0).reshape(-1)[:limit]


def side_by_side(rows: list, model: nn.Module, copy: nn.Module, task, layer: str, limit: int) -> None:
    """Incremental on the whole matrix against naive on its first `limit` weights, per weight: the visiting
    order is the same, so the naive loop's decisions on that prefix must be the incremental one's."""
    name = f"classifier.{layer}.weight"
    fast, fast_seconds = timed(lambda: greedy_weight_circuit(model, *task, params=[name]))
    naive, naive_seconds = timed(lambda: naive_greedy(copy, *task, name, limit))
    size = fast.mask[name].numel()
    limit = min(limit, size)
    same = int((fast.mask[name].reshape(-1)[:limit] == naive).sum())
    fast_per, naive_per = fast_seconds / size * 1e6, naive_seconds / limit * 1e6
    rows.append(
        (
            f"greedy, {layer} only ({size:,} weights): incremental",
            f"{fast_seconds:.2f} s",
            f"{fast_per:.0f} us a weight",
        )
    )
    rows.append(
        (
            f"greedy, {layer}: naive full forward per weight, first {limit:,}",
            f"{naive_seconds:.2f} s",
            f"{naive_per:.0f} us a weight: ratio {naive_per / fast_per:.1f}x; same decision on {same}/{limit}",
        )
    )


def greedy_part(rows: list) -> None:
    data = digits()
    inputs, targets = to_shape(data.inputs, (1, 28, 28)), data.labels
    torch.manual_seed(0)
    model, seconds = timed(lambda: trained(MnistMLP(), inputs, targets, 300, 1e-3))
    task = (inputs[targets == LABEL], targets[targets == LABEL])
    rows.append(("MNIST MLP: training on digits (300 full-batch steps)", f"{seconds:.1f} s", ""))
    circuit, seconds = timed(lambda: greedy_weight_circuit(model, *task))
    rows.append(
        (
            f"greedy, whole model (59,008 weights), label {LABEL}, {len(task[1])} examples",
            f"{seconds:.1f} s",
            f"size {circuit.size:.4f}",
        )
    )
    paper, seconds = timed(lambda: greedy_weight_circuit(model, *task, reference="original"))
    rows.append(("greedy, whole model, paper mode", f"{seconds:.1f} s", f"size {paper.size:.4f}"))
    for layer, limit in (("fc2", 4096), ("fc1", 8192)):
        side_by_side(rows, model, _copy(MnistMLP(), model), task, layer, limit)


def cnn_part(rows: list) -> None:
    """The CIFAR CNN (random weights, 500 random images; the task is the images it assigns to class 3): every
    naive evaluation runs the convolution again, the incremental one never does."""
    torch.manual_seed(0)
    model = CifarCNN().eval()
    images = torch.randn(500, 3, 32, 32)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    chosen = predicted == int(predicted.mode().values)
    task = (images[chosen], predicted[chosen])
    rows.append((f"CIFAR CNN (random), {len(task[1])} examples of its most predicted class", "", ""))
    side_by_side(rows, model, _copy(CifarCNN(), model), task, "fc3", 256)


def _copy(empty: nn.Module, model: nn.Module) -> nn.Module:
    empty.load_state_dict(model.state_dict())
    return empty


def attribution_part(rows: list, steps: int, batch: int, length: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    tokens = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.no_grad():
        answers = model(tokens).logits.argmax(-1)  # [batch, length]: the model's own predictions

    def loss(model, batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten())

    params = [f"transformer.h.{i}.mlp.{m}.weight" for i in range(12) for m in ("c_fc", "c_proj")]
    circuit, seconds = timed(
        lambda: attribution_weight_circuit(model, [(tokens, answers)], loss, params=params, ig_steps=steps)
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows.append(
        (
            f"attribution, GPT-2 124M MLPs (56.6 M weights), K={steps}, {batch}x{length} tokens",
            f"{seconds:.0f} s",
            f"{len(circuit.curve)} circuits judged; peak RSS {peak:.1f} GiB",
        )
    )
    rows.append(
        (
            "  its size at tau 0.8 / 0.9 / 0.95 / 1.0 (random model, timing only)",
            "",
            " / ".join(f"{circuit.size_at[tau]:.4f}" for tau in (0.8, 0.9, 0.95, 1.0)),
        )
    )


def agreement_part(rows: list) -> None:
    data = digits()
    inputs, targets = data.inputs.flatten(1).double(), data.labels
    torch.manual_seed(0)
    model = trained(
        nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False)).double(),
        inputs,
        targets,
        150,
        1e-2,
    )

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    for label in range(4):
        task = (inputs[targets == label], targets[targets == label])
        attribution = attribution_weight_circuit(model, [task], loss).masks[1.0]
        for reference in ("original", "current"):
            greedy = greedy_weight_circuit(model, *task, reference=reference).mask
            both = sum(int((greedy[n] & attribution[n]).sum()) for n in greedy)
            either = sum(int((greedy[n] | attribution[n]).sum()) for n in greedy)
            rows.append(
                (
                    f"digits MLP 64-32-10, label {label}: greedy ({reference}) vs attribution tau 1.0",
                    "",
                    f"sizes {_share(greedy):.4f} vs {_share(attribution):.4f}, Jaccard {both / either:.2f}",
                )
            )


def actor_part(rows: list) -> None:
    from orchestrator.train.job_checks import load_spec

    spawn = multiprocessing.get_context("spawn")
    for what, job, overrides, steps in ACTOR_JOBS:
        spec = load_spec(ROOT / "jobs" / job, list(overrides))
        parameters = _job_weights(spec, steps)
        with spawn.Pool(1) as pool:
            before, peak, seconds, logged, skipped = pool.apply(
                _actor_measurement, (spec.model_dump(mode="json", by_alias=True), parameters)
            )
        options = spec.circuits
        label = f"circuits actor, {what}: {options.max_examples} examples a task, K={options.ig_steps}, "
        rows.append(
            (
                label + f"{options.null_draws} null draws",
                f"{seconds:.1f} s",
                f"peak RSS {peak:.2f} GiB ({before:.2f} GiB before the measurement); {logged} metrics"
                + (f"; skipped: {', '.join(skipped)}" if skipped else ""),
            )
        )


def _job_weights(spec, steps: int) -> dict[str, np.ndarray]:
    """The job's model trained `steps` full steps on its own data (a classifier: all its examples at once; a
    language model: 16 blocks of its corpus a step), as the gathered weights the actor receives."""
    from orchestrator.circuit_report import loaded_model_from_spec

    loaded = loaded_model_from_spec(spec)
    model = loaded.model
    if loaded.kind == "classifier":
        model = trained(model.train(), loaded.labelled.inputs, loaded.labelled.labels, steps, 1e-3)
    elif steps:
        from orchestrator.data.corpus import build_synthetic_blocks

        blocks, _ = build_synthetic_blocks(64 * steps, spec.data.block_size, 0, tokenizer=loaded.tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), spec.training.lr)
        model.train()
        for step in range(steps):
            batch = blocks[16 * step : 16 * (step + 1)]
            logits = model(batch[:, :-1]).logits
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def _actor_measurement(spec: dict, parameters: dict[str, np.ndarray]) -> tuple[float, float, float, int, list[str]]:
    """In a fresh process: the actor's one measurement of `parameters` (the last step's), its resident memory
    before and at its peak (GiB), seconds, metrics it gives and what it skipped."""
    from orchestrator.circuit_job.actor import CircuitsActor

    actor = CircuitsActor.__ray_actor_class__(spec, str(ROOT))  # the class itself: its code, without Ray
    before = _own_peak_gib()
    answer, seconds = timed(lambda: actor.compute(0, parameters, None))
    return before, _own_peak_gib(), seconds, len(answer.metrics), sorted(answer.skipped)


def _own_peak_gib() -> float:
    """This process's own peak resident memory: Linux's VmHWM. ru_maxrss, the fallback elsewhere, also counts the
    parent's resident memory when it forked this process (Linux keeps it across the spawn's exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gather_part(rows: list) -> None:
    """Rank 0's side of the circuits gather on GPT-2 124M shapes: the memory its process allocates at the peak
    (tracemalloc: numpy's and Python's allocations; the object store's shared memory is the node's, read by the
    actor in place) and the time, for the whole-model copy and for the streamed one, and whether the actor gets
    bit-identical weights from each."""
    import tracemalloc

    import ray
    import transformers

    from orchestrator.gather import gather_parameters
    from orchestrator.ranks import Rank

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=259))
    largest = max(p.numel() for p in model.parameters()) * 4 / 2**30
    total = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=2 * 2**30)
    try:
        gathered = {}
        for what, store in (("whole-model copy", None), ("streamed to the object store", ray.put)):
            gathered[what], seconds = timed(lambda store=store: gather_parameters(model, Rank(0, 2), store))
            tracemalloc.start()  # a second pass for the memory: tracing slows allocation
            gather_parameters(model, Rank(0, 2), store)
            peak = tracemalloc.get_traced_memory()[1] / 2**30
            tracemalloc.stop()
            rows.append(
                (
                    f"rank 0 gather, GPT-2 124M shapes, {what}",
                    f"{seconds:.1f} s",
                    f"peak {peak:.3f} GiB allocated (model {total:.3f} GiB, largest parameter {largest:.3f} GiB)",
                )
            )
        copies, refs = gathered.values()
        same = all(np.array_equal(copies[name], ray.get(ref)) for name, ref in refs.items())
        rows.append(("streamed == whole-model weights", "-", f"bit-identical: {same}"))
    finally:
        ray.shutdown()


def _share(mask: dict) -> float:
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


PARTS = {
    "greedy": lambda rows, quick: greedy_part(rows),
    "cnn": lambda rows, quick: cnn_part(rows),
    "agreement": lambda rows, quick: agreement_part(rows),
    "attribution": lambda rows, quick: attribution_part(rows, *((2, 2, 32) if quick else (8, 4, 64))),
    "actor": lambda rows, quick: actor_part(rows),
    "gather": lambda rows, quick: gather_part(rows),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 attribution with K=2 on 2x32 tokens")
    parser.add_argument("--part", choices=("all", *PARTS), default="all", help="run one part only")
    args = parser.parse_args()
    print(f"what, time, result (torch threads: {torch.get_num_threads()})")
    for name, part in PARTS.items():
        if args.part in ("all", name):
            rows: list[tuple[str, str, str]] = []
            part(rows, args.quick)
            width = max(len(row[0]) for row in rows)
            for what, seconds, result in rows:
                print(f"{what:<{width}}  {seconds:>8}  {result}", flush=True)


if __name__ == "__main__":
    main()

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
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from torch import nn

from orchestrator.circuits import attribution_weight_circuit, greedy_weight_circuit
from orchestrator.circuits.chain_state import ChainState
from orchestrator.data.images import digits, to_shape
from orchestrator.models.vision import CifarCNN, MnistMLP

LABEL = 3


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


def _share(mask: dict) -> float:
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 attribution with K=2 on 2x32 tokens")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    greedy_part(rows)
    cnn_part(rows)
    agreement_part(rows)
    attribution_part(rows, *((2, 2, 32) if args.quick else (8, 4, 64)))
    width = max(len(row[0]) for row in rows)
    print(f"{'what':<{width}}  {'time':>8}  result (torch threads: {torch.get_num_threads()})")
    for what, seconds, result in rows:
        print(f"{what:<{width}}  {seconds:>8}  {result}")


if __name__ == "__main__":
    main()

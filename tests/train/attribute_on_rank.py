"""One rank of the sharded attribution test (run as a script: ``rank world_size directory``; MASTER_ADDR and
MASTER_PORT in the environment).

A separate process rather than a fork: the pytest process may hold Ray's threads by the time this test runs.
Each rank trains the same tiny GPT-2 for a few steps (rank 0's weights, broadcast), wraps a copy of it in a real
DeepSpeed ZeRO-3 engine with every parameter sharded, once in fp32 and once in bf16, and runs
``sharded_attribution_circuit`` on each under a spy that records the largest tensor any torch call in that module
touches. Rank 0 writes the trained weights, each engine's weights (the bf16 reference's model) and circuit, with
the scores and masks gathered from the ranks for the comparison only; every rank writes what it checked of its
own partitions, under a folder per precision.
"""

import copy
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from orchestrator.circuit_tasks import IGNORE, language_metric
from orchestrator.circuits import MatrixLabels
from orchestrator.modularity import find_matrix_groups
from tests.helpers import tiny_gpt2, tiny_spec

VOCAB, LENGTH, BATCH, BATCHES = 64, 16, 8, 3  # 3 batches on 2 ranks: one rank repeats a batch at weight 0
IG_STEPS, TAUS, K = 4, (0.5, 0.9, 1.0), 4


def next_token(tokens: torch.Tensor) -> torch.Tensor:
    """The task: a fixed bigram map that the tiny model learns in a few dozen steps."""
    return (tokens * 7 + 3) % VOCAB


def task_batches(count: int = BATCHES, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) batches of the task, [BATCH, LENGTH] each; the first token is not predicted."""
    generator, batches = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        tokens = [torch.randint(0, VOCAB, (BATCH,), generator=generator)]
        for _ in range(LENGTH - 1):
            tokens.append(next_token(tokens[-1]))
        tokens = torch.stack(tokens, dim=1)  # [BATCH, LENGTH]
        labels = tokens.clone()
        labels[:, 0] = IGNORE
        batches.append((tokens, labels))
    return batches


def trained_model() -> torch.nn.Module:
    """The tiny GPT-2 after 40 Adam steps on the task, so that its MLPs matter to the metric; no gradient left
    on it (DeepSpeed's first backward would add to one)."""
    model = tiny_gpt2(vocab_size=VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in task_batches(40, seed=2):
        optimizer.zero_grad()
        language_metric(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad()
    return model.eval()


def cluster_labels(model: torch.nn.Module) -> dict[str, MatrixLabels]:
    """Seeded random clusters for every regularised matrix, by parameter name."""
    generator, labels = torch.Generator().manual_seed(3), {}
    for group in find_matrix_groups(model):
        for matrix in group.matrices:
            rows, cols = matrix.shape
            labels[f"{matrix.name}.weight"] = MatrixLabels(
                torch.randint(0, K, (rows,), generator=generator),
                torch.randint(0, K, (cols,), generator=generator),
                K,
                matrix.transposed,
            )
    return labels


class LargestTouched(TorchFunctionMode):
    """The largest tensor (elements) that any torch call made directly from the code of `path` takes or returns."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.largest = path, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if sys._getframe(1).f_code.co_filename == self.path:
            for value in (*args, *(kwargs or {}).values(), result):
                if isinstance(value, torch.Tensor):
                    self.largest = max(self.largest, value.numel())
        return result


def gathered(local: torch.Tensor, parameter: torch.nn.Parameter) -> torch.Tensor:
    """The whole matrix from every rank's flat partition of it (the test's check only)."""
    padded = torch.zeros(parameter.ds_tensor.ds_numel, dtype=local.dtype)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, padded)
    return torch.cat(parts)[: parameter.ds_numel].reshape(parameter.ds_shape)


def main(rank: int, world_size: int, directory: Path) -> None:
    from orchestrator.train.engine import build_engine

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    model = trained_model()
    for parameter in model.parameters():  # every rank starts from rank 0's weights
        torch.distributed.broadcast(parameter.data, 0)
    if rank == 0:
        torch.save(model.state_dict(), directory / "model.pt")
    labels, bf16_model = cluster_labels(model), copy.deepcopy(model)  # each engine converts the module it is given
    for precision, module in (("fp32", model), ("bf16", bf16_model)):
        spec = tiny_spec(
            "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0", f"training.precision={precision}"
        )
        attribute(build_engine(module, spec, world_size), labels, rank, directory / precision)
    torch.distributed.destroy_process_group()


def attribute(engine, labels: dict[str, MatrixLabels], rank: int, directory: Path) -> None:
    """``sharded_attribution_circuit`` on `engine`: every rank writes what it checked of its own partitions, rank 0
    the weights the engine holds (as float32) and the circuit."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    import orchestrator.sharded_attribution as sharded

    directory.mkdir(exist_ok=True)
    parameters = dict(engine.module.named_parameters())
    before = {name: p.ds_tensor.clone() for name, p in parameters.items()}
    masters = {name: safe_get_local_fp32_param(p).clone() for name, p in parameters.items()}
    spy, started = LargestTouched(sharded.__file__), time.perf_counter()
    with spy:
        circuit = sharded.sharded_attribution_circuit(
            engine, task_batches(), language_metric, ig_steps=IG_STEPS, taus=TAUS, partition=labels
        )
    own = {
        "seconds": time.perf_counter() - started,
        "dtype": str(next(iter(parameters.values())).ds_tensor.dtype),
        "largest_touched": spy.largest,
        "smallest_scoped": min(parameters[name].ds_numel for name in circuit.scores),
        "weights_identical": all(torch.equal(p.ds_tensor, before[name]) for name, p in parameters.items()),
        "masters_identical": all(
            torch.equal(safe_get_local_fp32_param(p), masters[name]) for name, p in parameters.items()
        ),
        "grads_zero": all(not safe_get_local_grad(p).any() for p in parameters.values()),
        "micro_step_id": engine.optimizer.micro_step_id,
        "training_mode": engine.module.training,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    torch.save(own, directory / f"rank{rank}.pt")
    weights = {name: gathered(p.ds_tensor.float(), p) for name, p in parameters.items()}
    scores = {name: gathered(score, parameters[name]) for name, score in circuit.scores.items()}
    masks = {
        tau: {name: gathered(m.to(torch.uint8), parameters[name]).bool() for name, m in mask.items()}
        for tau, mask in circuit.masks.items()
    }
    if rank == 0:
        torch.save(weights, directory / "weights.pt")
        fields = ("full", "none", "faithfulness", "size_at", "sizes_at", "cpr", "cmd", "curve", "method")
        result = {field: getattr(circuit, field) for field in fields}
        result |= {"scores": scores, "masks": masks, "locality": {t: loc.share for t, loc in circuit.locality.items()}}
        result["blocks"] = {t: loc.blocks for t, loc in circuit.locality.items()}
        result["faithfulness"] = torch.from_numpy(circuit.faithfulness)  # tensors load without unpickling code
        torch.save(result, directory / "circuit.pt")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))

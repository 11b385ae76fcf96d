"""Sharded training with the clusterability loss: 2 Ray Train workers under DeepSpeed ZeRO, one shared job.

One Ray Train job (its start-up is the slow part) runs every case in turn on the same 2 workers: the exactness
cases take one step and save the loss and the full gradient of every parameter, which the tests compare with
a plain single-process torch computation of the same model, partition and batch; the family cases train each
model family a few steps at a ZeRO stage and save the loss and clusterability curves.
"""

import sys

import pytest
import torch

from orchestrator.data import build_training_data
from orchestrator.models import build_model
from orchestrator.modularity import clusterability, find_matrix_groups, partition_group
from orchestrator.spec import JobSpec
from orchestrator.train.objectives import objective_for
from tests.helpers import tiny_spec

WORKERS = 2
VOCAB = 259  # the byte tokenizer's
BATCH = 8  # sequences in the global batch of an exactness case
TOLERANCE = 1e-5  # fp32, as the issue asks

EXACTNESS = {  # case name -> overrides of jobs/tiny.yaml; the ZeRO-3 cases shard every parameter
    "zero3": ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"],
    "zero3_accumulation": [
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        "training.gradient_accumulation_steps=2",
    ],
    "zero3_checkpointing": [
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        "training.activation_checkpointing=true",
    ],
    "zero3_offload": [
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        "deepspeed.offload_optimizer=true",
    ],
    "zero2": ["deepspeed.zero_stage=2"],
    "zero1": ["deepspeed.zero_stage=1"],
    "zero3_bf16": ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0", "training.precision=bf16"],
}
FAMILY_STEPS = 5
# case name -> overrides: each transformer family under ZeRO-2 and under ZeRO-3 (really sharded), xcm's own models
# under ZeRO-3; the CIFAR CNN trains under ZeRO-3 in tests/e2e/test_classifier_run.py (each case costs seconds here).
FAMILIES = {
    **{
        f"{family}_zero3": [
            f"model.family={family}",
            "deepspeed.zero_stage=3",
            "deepspeed.param_persistence_threshold=0",
        ]
        for family in ("gpt2", "gpt_neox", "gemma")
    },
    **{
        f"{family}_zero2": [f"model.family={family}", "deepspeed.zero_stage=2"]
        for family in ("gpt2", "gpt_neox", "gemma")
    },
    "mnist_mlp_zero3": [
        "model.family=mnist_mlp",
        "data.source=digits",
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
    ],
    "modular_addition_zero3": [
        "model.family=modular_addition",
        "data.source=modular_addition",
        "data.modulus=23",
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
    ],
}
# fp16 with dynamic loss scaling from 2^20 (the first steps' scaled gradients overflow), a fast warm-up so the LR
# differs at every optimizer step, and enough steps to learn after the scale has come down.
FP16_STEPS = 14
FP16 = {
    name: [*zero, "training.initial_loss_scale_power=20", "training.warmup_steps=10"]
    for name, zero in {
        "zero2_fp16": ["deepspeed.zero_stage=2"],
        "zero3_fp16": ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"],
    }.items()
}
COMMON = [
    "training.lr=0.01",
    "training.micro_batch_size=8",
    "data.num_examples=2000",
    "evaluation.every_steps=0",
    "modularity.lambda=20",
]


def case_spec(overrides: list[str]) -> JobSpec:
    return tiny_spec(*COMMON, *overrides)


def fp16_case_spec(name: str) -> JobSpec:
    """An fp16 case's spec. The spec check refuses fp16 on a CPU without native fp16, as DeepSpeed does (this
    machine has none); torch still computes fp16 on any CPU, so the case sets it after the check and lifts
    DeepSpeed's refusal in the worker (``allow_cpu_fp16``) to run the loss-scaling path a GPU runs."""
    spec = case_spec(FP16[name])
    return spec.model_copy(update={"training": spec.training.model_copy(update={"precision": "fp16"})})


def allow_cpu_fp16() -> None:
    """Let DeepSpeed's CPU accelerator take fp16 on a CPU without native fp16 (see ``fp16_case_spec``)."""
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda accelerator: True


def global_batch() -> torch.Tensor:
    """The exactness cases' batch: [BATCH, 33] token blocks, the same in every process."""
    return torch.randint(0, VOCAB, (BATCH, 33), generator=torch.Generator().manual_seed(1))


def initial_partitions(model: torch.nn.Module, spec: JobSpec) -> dict:
    """Spectral partitions of the freshly built model's matrix groups, as plain dicts (they travel by file)."""
    modularity = spec.modularity
    return {
        group.name: partition_group(
            [m.weight() for m in group.inputs],
            [m.weight() for m in group.outputs],
            modularity.k,
            method=modularity.partition,
            seed=modularity.seed,
        ).to_dict()
        for group in find_matrix_groups(model, modularity.matrices)
    }


def sharded_cases(config: dict) -> None:
    """Ray Train worker: every case in turn on this rank; rank 0 saves each case's result."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    results = {}
    for name, spec in config["exactness"].items():
        results[name] = exactness_case(JobSpec.model_validate(spec), rank, world_size)
    for name, spec in config["families"].items():
        results[name] = family_case(JobSpec.model_validate(spec), rank, world_size)
    allow_cpu_fp16()
    for name, spec in config["fp16"].items():
        results[name] = family_case(JobSpec.model_validate(spec), rank, world_size, steps=FP16_STEPS)
    if rank == 0:
        torch.save(results, config["output"])


def engine_with_loss(spec: JobSpec, model: torch.nn.Module, partitions: dict, world_size: int):
    """The worker's own engine and regulariser, with the given partitions registered."""
    from orchestrator.modularity import ClusterabilityRegulariser, GroupPartition, regularise_groups
    from orchestrator.train.engine import build_engine

    engine = build_engine(model, spec, world_size)
    regulariser = ClusterabilityRegulariser()
    regularise_groups(
        regulariser,
        find_matrix_groups(engine.module, spec.modularity.matrices),
        {name: GroupPartition.from_dict(data) for name, data in partitions.items()},
    )
    return engine, regulariser


def exactness_case(spec: JobSpec, rank: int, world_size: int) -> dict:
    """One optimizer step on this rank's micro-batches; the full gradients are read before the update."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    model = build_model(spec.model, VOCAB, seed=0)
    partitions = initial_partitions(model, spec)
    engine, regulariser = engine_with_loss(spec, model, partitions, world_size)
    objective, accumulation = objective_for(spec), spec.training.gradient_accumulation_steps
    chunks = global_batch().chunk(world_size * accumulation)  # rank r reads chunks r·A .. r·A + A - 1
    task_losses, penalties = [], []
    for micro in range(accumulation):
        blocks = chunks[rank * accumulation + micro]
        regulariser.clear()
        task_loss, _ = objective.loss(engine, {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]})
        penalty = regulariser.penalty(spec.modularity.lambda_)
        engine.backward(task_loss + penalty)
        if micro < accumulation - 1:
            engine.step()  # not yet a boundary: DeepSpeed only counts the micro-batch
        task_losses.append(task_loss.item())
        penalties.append(penalty.item())
    # A collective under ZeRO-3 (every rank gathers), one parameter at a time.
    grads = {
        name: safe_get_full_grad(parameter).detach().float().clone()
        for name, parameter in engine.module.named_parameters()
    }
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, {"task_losses": task_losses, "penalties": penalties})
    engine.step()
    regulariser.remove()
    return {"partitions": partitions, "grads": grads, "ranks": every_rank}


def family_case(spec: JobSpec, rank: int, world_size: int, steps: int = FAMILY_STEPS) -> dict:
    """A few training steps of the spec's model on one micro-batch of its data (so the loss curve is not batch
    noise), with the loss on from the first step; after each step, the LR and (fp16) the loss-scaling metrics
    that the trainer logs. Then the task loss of the trained weights."""
    from orchestrator.train.worker import loss_scaling_metrics

    data = build_training_data(spec.data, spec.model)
    objective = objective_for(spec)
    model = build_model(spec.model, data.vocab_size, seed=spec.training.seed)
    engine, regulariser = engine_with_loss(spec, model, initial_partitions(model, spec), world_size)
    batch = next(objective.batches(data.train, spec.training.micro_batch_size, rank, world_size, spec.training.seed))
    curve = {"task_loss": [], "clusterability": [], "lr": [], "loss_scaling": []}
    for _ in range(steps):
        regulariser.clear()
        task_loss, _ = objective.loss(engine, batch)
        engine.backward(task_loss + regulariser.penalty(spec.modularity.lambda_))
        engine.step()
        curve["task_loss"].append(task_loss.item())
        curve["clusterability"].append(torch.stack(list(regulariser.values().values())).mean().item())
        curve["lr"].append(engine.get_lr()[0])
        curve["loss_scaling"].append(loss_scaling_metrics(engine, spec.training.precision))
    with torch.no_grad():
        curve["trained_task_loss"] = objective.loss(engine, batch)[0].item()
    curve["dtype"] = str(next(engine.module.parameters()).dtype)
    regulariser.remove()
    return curve


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, local_ray):
    """Results of every case, from one 2-worker Ray Train job."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train.launch import ensure_ray

    directory = tmp_path_factory.mktemp("sharded")
    ensure_ray(case_spec([]))  # the session's Ray, started as xcm starts it (or joined)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    config = {
        "output": str(directory / "results.pt"),
        "exactness": {name: case_spec(o).model_dump(mode="json", by_alias=True) for name, o in EXACTNESS.items()},
        "families": {name: case_spec(o).model_dump(mode="json", by_alias=True) for name, o in FAMILIES.items()},
        "fp16": {name: fp16_case_spec(name).model_dump(mode="json", by_alias=True) for name in FP16},
    }
    TorchTrainer(
        sharded_cases,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORKERS),
        run_config=RunConfig(name="sharded-cases", storage_path=str(directory / "ray")),
    ).fit()
    return torch.load(directory / "results.pt", weights_only=False)


def single_process_reference(name: str, partitions: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """The case's loss and gradients in plain torch: one process, the whole batch, C computed directly."""
    from orchestrator.modularity import GroupPartition

    spec = case_spec(EXACTNESS[name])
    model = build_model(spec.model, VOCAB, seed=0)
    blocks = global_batch()
    task_loss, _ = objective_for(spec).loss(model, {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]})
    values = []
    for group in find_matrix_groups(model, spec.modularity.matrices):
        partition = GroupPartition.from_dict(partitions[group.name])
        for matrix, (rows, cols) in zip(group.matrices, partition.matrix_labels(), strict=True):
            values.append(clusterability(matrix.weight(), rows, cols, partition.k))
    loss = task_loss - spec.modularity.lambda_ * torch.stack(values).mean()
    loss.backward()
    return loss.item(), {name: parameter.grad for name, parameter in model.named_parameters()}


def sharded_loss(result: dict) -> float:
    """The global batch's loss from the ranks' micro-batch losses (equal sizes, so the plain mean)."""
    values = [
        task + penalty
        for rank in result["ranks"]
        for task, penalty in zip(rank["task_losses"], rank["penalties"], strict=True)
    ]
    return sum(values) / len(values)


def regularised(name: str) -> list[str]:
    """Parameter names of the case's regularised matrices."""
    spec = case_spec(EXACTNESS[name])
    model = build_model(spec.model, VOCAB, seed=0)
    return [f"{m.name}.weight" for group in find_matrix_groups(model, spec.modularity.matrices) for m in group.matrices]


def largest_gradient_error(result: dict, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        name: (result["grads"][name].reshape(grad.shape) - grad).abs().max().item() for name, grad in reference.items()
    }


@pytest.mark.slow
def test_zero3_loss_and_gradients_equal_one_process(sharded):
    """Under ZeRO-3 with every parameter sharded, the loss and each regularised gradient equal one process to 1e-5."""
    result = sharded["zero3"]
    loss, reference = single_process_reference("zero3", result["partitions"])
    assert abs(sharded_loss(result) - loss) < TOLERANCE
    penalties = {penalty for rank in result["ranks"] for penalty in rank["penalties"]}
    assert len(penalties) == 1  # every rank computed the same -λ·mean C from its gathered matrices
    errors = largest_gradient_error(result, reference)
    names = regularised("zero3")
    assert len(names) == 4 and max(errors[name] for name in names) < TOLERANCE, errors
    assert max(errors.values()) < TOLERANCE, errors  # the unregularised parameters too


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero3_accumulation", "zero3_checkpointing", "zero3_offload", "zero2", "zero1"])
def test_every_stage_and_option_keeps_gradients_exact(sharded, case):
    """Gradient accumulation, activation checkpointing, optimizer offload, ZeRO-1 and ZeRO-2 keep loss and
    gradients exact."""
    result = sharded[case]
    loss, reference = single_process_reference(case, result["partitions"])
    assert abs(sharded_loss(result) - loss) < TOLERANCE
    errors = largest_gradient_error(result, reference)
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
def test_bf16_zero3_gradients_match_fp32_to_bf16_precision(sharded):
    """bf16 under ZeRO-3 computes the same loss and gradients as fp32, to bf16's ~3 significant digits."""
    result = sharded["zero3_bf16"]
    loss, reference = single_process_reference("zero3_bf16", result["partitions"])
    assert abs(sharded_loss(result) - loss) < 2e-2 * abs(loss)
    for name in regularised("zero3_bf16"):
        grad = reference[name]
        assert (result["grads"][name].reshape(grad.shape) - grad).norm() < 2e-2 * grad.norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_family_trains_with_the_loss(sharded, case):
    """Each model family trains under its ZeRO stage with the loss: task loss falls and clusterability rises."""
    curve = sharded[case]
    assert all(torch.isfinite(torch.tensor(curve["task_loss"])))
    assert curve["task_loss"][-1] < curve["task_loss"][0], curve
    assert curve["clusterability"][-1] > curve["clusterability"][0], curve


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FP16))
def test_fp16_loss_scaling_skips_overflowing_steps_then_trains(sharded, case):
    """fp16 with the loss on, under ZeRO-2 and ZeRO-3: the steps whose scaled gradients overflow are skipped
    (weights and LR schedule stay put) and halve the scale; the applied steps then lower the task loss and
    raise clusterability, and the trained weights are finite."""
    from orchestrator import metric_names
    from orchestrator.train.schedule import lr_multiplier

    curve, training = sharded[case], fp16_case_spec(case).training
    assert curve["dtype"] == "torch.float16"
    scales = [step[metric_names.LOSS_SCALE] for step in curve["loss_scaling"]]
    skipped = [int(step[metric_names.SKIPPED_STEPS]) for step in curve["loss_scaling"]]
    assert skipped[0] == 1 and skipped[-1] >= 2, skipped  # 2^20 overflows at once
    assert scales[-1] < 2.0**20 and scales == sorted(scales, reverse=True), scales  # halved, never raised
    applied = FP16_STEPS - skipped[-1]
    assert applied >= FP16_STEPS // 2, skipped  # the scale came down within a few steps
    # The schedule counts applied steps.
    for step, (lr, skipped_so_far) in enumerate(zip(curve["lr"], skipped, strict=True)):
        assert lr == pytest.approx(training.lr * lr_multiplier(step + 1 - skipped_so_far, training)), (step, skipped)
    losses = curve["task_loss"]  # each before its step's update, on the same batch (no dropout)
    for step in range(FP16_STEPS - 1):
        skipped_here = skipped[step] > (skipped[step - 1] if step else 0)
        assert (losses[step + 1] == losses[step]) == skipped_here, (step, skipped, losses)  # skipped: weights kept
    assert curve["trained_task_loss"] < curve["task_loss"][0], curve
    assert curve["clusterability"][-1] > curve["clusterability"][0], curve

"""The circuits side job's spec check, through `xcm check`, and the streamed gather its actor reads."""

import pytest
import torch

from orchestrator import cli
from orchestrator.gather import Needs
from orchestrator.spec import INVALID_JOB_EXIT_CODE
from tests.helpers import ROOT, TINY_JOB, tiny_spec


def test_check_refuses_the_greedy_finder_for_gpt2_naming_attribution(tmp_path, capsys, monkeypatch):
    """`xcm check` of the tiny GPT-2 job with `circuits.method: greedy` fails with one line naming attribution,
    and passes once the method is attribution."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "tiny-circuits.yaml"
    job.write_text(TINY_JOB.read_text() + "circuits:\n  every_steps: 5\n  method: greedy\n")
    assert cli.main(["check", str(job)]) == INVALID_JOB_EXIT_CODE
    err = capsys.readouterr().err
    assert "circuits.method" in err and "circuits.method: attribution" in err and "Traceback" not in err
    job.write_text(TINY_JOB.read_text() + "circuits:\n  every_steps: 5\n  method: attribution\n")
    assert cli.main(["check", str(job)]) == 0


RANKS = "  every_steps: 5\n  attribution_on: ranks\n"
ZERO_3 = ("  zero_stage: 2\n", "  zero_stage: 3\n")


@pytest.mark.parametrize(
    ("circuits", "edit", "key", "message", "fix"),
    [
        (RANKS + "  method: attribution\n", ("", ""), "circuits.attribution_on", "deepspeed.zero_stage is 2",
         "set deepspeed.zero_stage: 3, or circuits.attribution_on: actor"),
        (RANKS + "  method: attribution\n", ("  zero_stage: 2\n", "  zero_stage: 3\n  offload_optimizer: true\n"),
         "circuits.attribution_on", "offload_optimizer moves",
         "set deepspeed.offload_optimizer: false, or circuits.attribution_on: actor"),
        (RANKS, ZERO_3, "circuits.method", "all with circuits.attribution_on: ranks",
         "set circuits.method: attribution, or circuits.attribution_on: actor"),
        (RANKS + "  method: [attribution, specialization]\n", ZERO_3, "circuits.method", "need whole matrices",
         "set circuits.method: attribution, or circuits.attribution_on: actor"),
    ],
)  # fmt: skip
def test_check_refuses_attribution_on_ranks_where_the_ranks_cannot_compute_it(
    tmp_path, capsys, monkeypatch, circuits, edit, key, message, fix
):
    """`circuits.attribution_on: ranks` outside ZeRO-3, with the optimizer offloaded, or with a method that needs
    whole matrices (the default, all, among them): `xcm check` fails with one line naming the key and its fix."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "tiny-ranks.yaml"
    job.write_text(TINY_JOB.read_text().replace(*edit) + "circuits:\n" + circuits)
    assert cli.main(["check", str(job)]) == INVALID_JOB_EXIT_CODE
    (line,) = capsys.readouterr().err.splitlines()
    assert f": {key}: " in line and message in line and f"Fix: {fix}" in line, line


def test_check_refuses_attribution_on_ranks_in_fp16_naming_bf16_and_the_actor(tmp_path, capsys, monkeypatch):
    """`circuits.attribution_on: ranks` on a ZeRO-3 fp16 GPU job (which the CPU-precision check lets through):
    `xcm check` fails with one line naming the loss scale and the fix; the same job in bf16 passes."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "tiny-ranks-fp16.yaml"
    text = TINY_JOB.read_text().replace(*ZERO_3).replace("gpus_per_worker: 0", "gpus_per_worker: 1")
    circuits = "circuits:\n" + RANKS + "  method: attribution\n"
    job.write_text(text.replace("precision: fp32", "precision: fp16") + circuits)
    assert cli.main(["check", str(job)]) == INVALID_JOB_EXIT_CODE
    (line,) = capsys.readouterr().err.splitlines()
    assert ": circuits.attribution_on: " in line and "dynamic loss scale" in line, line
    assert "Fix: set training.precision: bf16 (or fp32), or circuits.attribution_on: actor" in line, line
    job.write_text(text.replace("precision: fp32", "precision: bf16") + circuits)
    assert cli.main(["check", str(job)]) == 0, capsys.readouterr().err


def test_check_passes_attribution_on_ranks_under_zero_3_and_any_stage_when_off(tmp_path, capsys, monkeypatch):
    """Attribution alone on the ranks of a ZeRO-3 job passes; so does `attribution_on: ranks` on a ZeRO-2 job
    whose circuits are off (every_steps 0), since nothing is computed; a value other than actor or ranks fails."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "tiny-ranks.yaml"
    job.write_text(TINY_JOB.read_text().replace(*ZERO_3) + "circuits:\n" + RANKS + "  method: [attribution]\n")
    assert cli.main(["check", str(job)]) == 0, capsys.readouterr().err
    job.write_text(TINY_JOB.read_text() + "circuits:\n  attribution_on: ranks\n")
    assert cli.main(["check", str(job)]) == 0, capsys.readouterr().err
    job.write_text(TINY_JOB.read_text() + "circuits:\n  attribution_on: driver\n")
    assert cli.main(["check", str(job)]) == INVALID_JOB_EXIT_CODE
    (line,) = capsys.readouterr().err.splitlines()
    assert "circuits.attribution_on" in line and "actor" in line and "ranks" in line, line


def test_a_resumed_run_measures_its_first_step_for_the_measurements_in_flight_at_the_checkpoint():
    """Every rank gathers at the same steps (every `every_steps`, never at 0); a checkpoint's in-flight steps
    make the resumed run's first boundary due once, and the schedule goes on as before."""
    from orchestrator.circuit_job.side_job import CircuitsJob
    from orchestrator.ranks import Rank

    job = CircuitsJob(3, 10, Rank(1, 2), [], lambda: None, None)
    assert [step for step in range(10) if job.due(step)] == [3, 6, 9]
    assert job.state_dict() is None
    job.load_state_dict({"in_flight": [2]})
    assert job.due(4)
    job.submit(4, None)
    assert [step for step in range(4, 10) if job.due(step)] == [6, 9]


def test_on_ranks_the_job_measures_at_the_actor_paths_steps_and_keeps_nothing_in_flight():
    """`attribution_on: ranks`: due every `every_steps` (never at 0), nothing gathered, an empty checkpoint state;
    an actor-path checkpoint's in-flight steps make the first boundary due once, as on the actor path."""
    from orchestrator.circuit_job.on_ranks import RanksCircuitsJob
    from orchestrator.side_jobs import SideJobContext

    spec = tiny_spec("training.steps=10", "circuits.every_steps=3")
    job = RanksCircuitsJob(spec, SideJobContext(None, None, [], None, [], None))
    assert [step for step in range(10) if job.due(step)] == [3, 6, 9]
    assert job.needs() == Needs() and job.state_dict() is None
    job.load_state_dict({"in_flight": [2]})
    assert job.due(4)


def test_on_ranks_locality_is_measured_under_the_training_partition_only():
    """The ranks measure locality under the partition training respects (lambda > 0, once adopted); before it, and
    for a control (lambda 0, whose actor-path partition would need whole matrices), under none."""
    from orchestrator.circuit_job.on_ranks import NO_PARTITION, RanksCircuitsJob
    from orchestrator.side_jobs import SideJobContext

    adopted = {"transformer.h.0.mlp": object()}

    def job(lam: float, current) -> RanksCircuitsJob:
        context = SideJobContext(None, None, [], None, [], None, partitions=lambda: current)
        return RanksCircuitsJob(tiny_spec(f"modularity.lambda={lam}", "circuits.every_steps=3"), context)

    assert job(20, adopted)._partitions() == (adopted, "training")
    assert job(20, None)._partitions() == (None, NO_PARTITION)
    assert job(0, adopted)._partitions() == (None, NO_PARTITION)


@pytest.mark.parametrize(
    "overrides",
    [
        ("circuits.tasks=['synthetic:add,count']", "circuits.max_examples=80", "circuits.seed=3"),
        ("circuits.tasks=['synthetic:copy']", "circuits.max_examples=16", "circuits.eval_on_find_data=true"),
        (
            "model.family=mnist_mlp",
            "data.source=digits",
            "circuits.tasks=['labels:0+1,2']",
            "circuits.max_examples=200",
        ),
    ],
)
def test_the_ranks_score_the_tasks_the_actor_path_scores(overrides, tmp_path):
    """The tasks actor's batches (built from a meta-device skeleton, no weights) are the circuits actor's, for a
    language model and a classifier: the same tasks, split, seed and batches, and no judging batches when circuits
    judge on the finding half."""
    from orchestrator.circuit_job.actor import task_batches
    from orchestrator.circuit_report import BATCH_SIZE, loaded_model_from_spec, task_set_for
    from orchestrator.train.job_checks import load_spec

    if "model.family=mnist_mlp" in overrides:
        spec = load_spec(ROOT / "jobs" / "mnist_mlp.yaml", list(overrides[1:]))
    else:
        spec = tiny_spec(*overrides)
    reference = task_set_for(loaded_model_from_spec(spec), spec.circuits.tasks, spec.circuits, tmp_path)
    batches = task_batches(spec, tmp_path)
    assert [name for name, _, _ in batches] == reference.names()
    for (_, find, judge), task in zip(batches, reference.tasks, strict=True):
        for (inputs, targets), expected in zip(find, task.find.batches(BATCH_SIZE), strict=True):
            assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
        if spec.circuits.eval_on_find_data:
            assert judge is None
        else:
            assert all(torch.equal(a[0], b[0]) for a, b in zip(judge, task.judge.batches(BATCH_SIZE), strict=True))


def test_the_actor_computes_on_cuda_only_when_given_a_gpu_that_it_sees():
    """The circuits actor's device: cuda for any share of a GPU with CUDA visible; the CPU with no GPU given (even
    when one is visible) or with none visible."""
    from orchestrator.circuit_job.device import circuits_device

    assert circuits_device(1, cuda_available=True).type == "cuda"
    assert circuits_device(0.25, cuda_available=True).type == "cuda"
    assert circuits_device(0, cuda_available=True).type == "cpu"
    assert circuits_device(1, cuda_available=False).type == "cpu"


def test_a_placed_model_takes_cpu_inputs_and_a_cpu_copy_of_it_its_own():
    """A model placed on another device (here "meta", which needs no GPU) is called with the CPU tensors the
    tasks hold and computes there; a copy moved back to the CPU, as the greedy finder's is, computes on the CPU."""
    import copy

    import torch
    from torch import nn

    from orchestrator.circuit_job.device import on_device

    model = on_device(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.device("meta"))
    inputs = torch.ones(5, 4)
    assert model(inputs).device.type == "meta"
    assert model(input=inputs).device.type == "meta"
    assert copy.deepcopy(model).to_empty(device="cpu")(inputs).device.type == "cpu"


@pytest.mark.slow
def test_streamed_gather_gives_the_actor_the_same_circuits_as_the_whole_copy(local_ray):
    """The circuits job's gather streams: rank 0 keeps only object-store refs, one parameter put at a time, and
    the actor given those refs scores the tiny GPT-2 exactly as given the whole-model copy (the same attribution
    sizes, faithfulness and specialization, bit for bit)."""
    import numpy as np
    import ray

    from orchestrator.circuit_job.actor import CircuitsActor
    from orchestrator.circuit_job.side_job import CircuitsJob
    from orchestrator.gather import gather
    from orchestrator.models import build_model
    from orchestrator.ranks import Rank

    spec = tiny_spec(
        "circuits.method=all",
        "circuits.tasks=['synthetic:add,count']",
        "circuits.max_examples=16",
        "circuits.ig_steps=2",
        "circuits.null_draws=2",
        "circuits.taus=[0.9]",
    )
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False)
    model = build_model(spec.model, 259, seed=3)
    whole = gather(Needs(model=True), model, [], Rank(0, 2)).model
    streamed = gather(CircuitsJob.needs(), model, [], Rank(0, 2)).model
    assert all(isinstance(value, ray.ObjectRef) for value in streamed.values())
    assert all(np.array_equal(whole[name], ray.get(ref)) for name, ref in streamed.items())
    actor = CircuitsActor.__ray_actor_class__(spec.model_dump(mode="json", by_alias=True), str(ROOT))
    from_copy, from_refs = (actor.compute(7, parameters, None) for parameters in (whole, streamed))
    assert list(from_refs.metrics) == list(from_copy.metrics) and len(from_refs.metrics) > 10
    assert np.array_equal(list(from_refs.metrics.values()), list(from_copy.metrics.values()), equal_nan=True)
    assert any(key.startswith("specialization/depends_on/") for key in from_refs.metrics)

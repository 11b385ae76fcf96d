"""The circuits actor: rebuilds the small model from gathered weights and runs ``xcm circuits``'s methods on it.

The driver starts one named actor with the job (``start_circuits_actor``), with ``circuits.cpus`` and
``circuits.gpus``. Each call carries everything it needs (the step's weights and the training partition), so
when the actor dies Ray restarts it (``max_restarts=-1``) and retries the call in flight (``max_task_retries=-1``);
what it caches (the model's skeleton, the tasks' examples) is rebuilt from the spec on the first call. Under
``circuits.attribution_on: ranks`` the driver starts ``CircuitTasksActor`` instead, which only builds the tasks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class CircuitsAnswer:
    """What one measurement gives rank 0 to log at its step."""

    step: int
    metrics: dict[str, float]
    artifacts: dict[str, bytes]  # artifact path -> bytes
    partition: str  # where the partition came from
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # "method task" -> why


@ray.remote(max_restarts=-1, max_task_retries=-1)
class CircuitsActor:
    """Computes circuits for the job's model at the steps it is sent."""

    def __init__(self, spec: dict, base_dir: str):
        self._spec = JobSpec.model_validate(spec)
        self._base_dir = Path(base_dir)
        cpus = self._spec.circuits.cpus
        torch.set_num_threads(max(1, int(cpus)))  # its reserved CPUs; one when it shares the trainers'
        self._loaded = None
        self._task_set = None

    def compute(
        self, step: int, parameters: dict[str, np.ndarray], partitions: dict[str, dict] | None
    ) -> CircuitsAnswer:
        """Circuits and specialization of the weights of `step`, under `partitions` (GroupPartition dicts by
        group name; a fresh spectral partition when None, and for a control, see ``measurement_partitions``)."""
        from orchestrator.circuit_report import find_circuits as run_methods
        from orchestrator.circuit_report import (
            measurement_partitions,
            methods_for,
            result_artifacts,
            result_metrics,
        )
        from orchestrator.modularity import GroupPartition

        started = time.perf_counter()
        loaded = self._loaded_at(step, parameters)
        options = self._spec.circuits
        training = None if partitions is None else {n: GroupPartition.from_dict(d) for n, d in partitions.items()}
        chosen, source = measurement_partitions(loaded, self._spec, training)
        task_set = self._tasks(loaded)
        methods = methods_for(options.method, loaded.kind, fix="circuits.method: attribution")
        result = run_methods(loaded, task_set, chosen, source, methods, options, progress=lambda message: None)
        return CircuitsAnswer(
            step,
            {key: float(value) for key, value in result_metrics(result).items()},
            result_artifacts(result, loaded.model, chosen),
            source,
            time.perf_counter() - started,
            dict(result.skipped),
        )

    def _loaded_at(self, step: int, parameters: dict[str, np.ndarray | ray.ObjectRef]):
        """The job's model with the weights of `step` (built, with its examples or tokenizer, on first use)."""
        from dataclasses import replace

        if self._loaded is None:
            from orchestrator.circuit_job.device import circuits_device, on_device
            from orchestrator.circuit_report import loaded_model_from_spec

            self._loaded = loaded_model_from_spec(self._spec)
            on_device(self._loaded.model, circuits_device(self._spec.circuits.gpus))
        own = dict(self._loaded.model.named_parameters())
        missing, extra = sorted(set(own) - set(parameters)), sorted(set(parameters) - set(own))
        if missing or extra:
            raise ValueError(f"the gathered weights lack {missing[:3]} or have {extra[:3]}: not this job's model")
        with torch.no_grad():
            for name, value in parameters.items():  # one at a time: a streamed gather's refs are fetched here
                array = ray.get(value) if isinstance(value, ray.ObjectRef) else value
                own[name].copy_(torch.from_numpy(np.array(array)))  # a writable copy: object-store arrays are not
        self._loaded = replace(self._loaded, step=step)
        return self._loaded

    def _tasks(self, loaded):
        from orchestrator.circuit_report import task_set_for

        if self._task_set is None:
            self._task_set = task_set_for(loaded, self._spec.circuits.tasks, self._spec.circuits, self._base_dir)
        return self._task_set


TaskBatches = tuple[str, list, list | None]  # a task's name, its finding batches, its judging ones (None: the same)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class CircuitTasksActor:
    """``circuits.attribution_on: ranks``: the job's circuit tasks, built as the circuits actor builds them (the
    same tasks, split and seed, task files read relative to the driver's working directory: the ranks run in
    Ray Train's) and handed to every rank, so that each scores the same batches. It holds no weights: the model
    it needs for the tasks' context (a language model's tokenizer and context length) is built on the meta
    device."""

    def __init__(self, spec: dict, base_dir: str):
        self._spec = JobSpec.model_validate(spec)
        self._base_dir = Path(base_dir)
        self._batches: list[TaskBatches] | None = None

    def batches(self) -> list[TaskBatches]:
        """Each task's batches, built on the first call."""
        if self._batches is None:
            self._batches = task_batches(self._spec, self._base_dir)
        return self._batches


def task_batches(spec: JobSpec, base_dir: Path) -> list[TaskBatches]:
    """Each of the job's circuit tasks, batched as ``find_circuits`` scores and judges attribution on them, from a
    skeleton of the model on the meta device (its config and kind only)."""
    from orchestrator.circuit_report import BATCH_SIZE, fresh_model, loaded_model_from_spec, model_kind, task_set_for

    tokenizer = None
    if model_kind(spec) == "language":
        from orchestrator.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spec.data, spec.model)
    with torch.device("meta"):
        skeleton = fresh_model(spec, tokenizer)
    options = spec.circuits
    tasks = task_set_for(loaded_model_from_spec(spec, skeleton), options.tasks, options, base_dir)
    judged = not options.eval_on_find_data
    return [
        (task.name, task.find.batches(BATCH_SIZE), task.judge.batches(BATCH_SIZE) if judged else None)
        for task in tasks.tasks
    ]


def start_tasks_actor(spec: JobSpec) -> dict[str, ray.actor.ActorHandle]:
    """Driver side, for ``attribution_on: ranks``: the tasks actor, by its (unique) Ray name, on no reserved CPU
    (it builds the tasks once, then only answers)."""
    name = f"xcm-circuit-tasks-{uuid.uuid4().hex[:12]}"
    actor = CircuitTasksActor.options(name=name, num_cpus=0)
    return {name: actor.remote(spec.model_dump(mode="json", by_alias=True), str(Path.cwd()))}


def start_circuits_actor(spec: JobSpec) -> dict[str, ray.actor.ActorHandle]:
    """Driver side: the job's circuits actor with the spec's resources, by its (unique) Ray name; task files
    are read relative to the driver's working directory, as ``xcm circuits`` reads them."""
    name = f"xcm-circuits-{uuid.uuid4().hex[:12]}"
    actor = CircuitsActor.options(name=name, num_cpus=spec.circuits.cpus, num_gpus=spec.circuits.gpus)
    return {name: actor.remote(spec.model_dump(mode="json", by_alias=True), str(Path.cwd()))}

"""Circuits on the training ranks (``circuits.attribution_on: ranks``): every ``circuits.every_steps`` steps and
after the last one, every rank of a ZeRO-3 job scores each task's attribution circuit on its own partitions of
the weights (``sharded_attribution_circuit``), so no rank ever holds a whole scoped matrix beyond ZeRO-3's own
layer-by-layer gather, and no actor needs the whole model. Training pauses for it: the ranks run the
measurement's forward and backward passes between two optimizer steps, and the weights and the optimizer are
left as they were. Rank 0 logs what the actor path logs, under the same names at the same step index (the
weights after N completed steps at index N - 1, the trained ones at the last), with each task's per-matrix mask
summary computed from counts summed over the ranks, never a gathered mask.

Locality needs a partition of the weights: the one training respects (lambda > 0). Before the first partition,
and for a control (lambda 0, whose actor-path partition is a spectral co-clustering of whole matrices), the
circuits are logged without locality.

Nothing is in flight between steps, so its checkpoint state is empty.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.circuit_job.measurement_log import log_measurement
from orchestrator.gather import Gathered, Needs

if TYPE_CHECKING:
    from orchestrator.circuit_job.actor import TaskBatches
    from orchestrator.circuits import AttributionCircuit
    from orchestrator.side_jobs import SideJobContext
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

NO_PARTITION = "none (locality needs the training partition: lambda > 0, after the first)"


class RanksCircuitsJob:
    """One rank's side; every rank computes, at the same steps (each pass is a collective); rank 0 logs."""

    def __init__(self, spec: JobSpec, context: SideJobContext):
        self._spec, self._context = spec, context
        self._every, self._end = spec.circuits.every_steps, spec.training.steps
        self._batches: list[TaskBatches] | None = None
        self._resumed_lost: list[int] = []  # steps an actor-path checkpoint had in flight

    def due(self, step: int) -> bool:
        return (step > 0 and step % self._every == 0) or bool(self._resumed_lost)

    @staticmethod
    def needs() -> Needs:
        """Nothing gathered: each rank reads its own partitions."""
        return Needs()

    def submit(self, step: int, gathered: Gathered | None) -> None:
        """Before step index `step`, `step` steps are done: their weights are measured for index `step - 1`."""
        self._measure(step - 1)

    def collect(self, step: int) -> None:
        """Nothing comes back later: each measurement is logged when it is made."""

    def finish(self, gathered: Gathered | None) -> None:
        self._measure(self._end - 1)

    @staticmethod
    def state_dict() -> None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint the actor path wrote may have had measurements in flight: the weights it resumes from are
        measured instead, as the actor path does."""
        self._resumed_lost = [int(step) for step in (state or {}).get("in_flight", [])]

    def _measure(self, step: int) -> None:
        """Every task's circuit of the current weights, logged at `step` by rank 0."""
        from orchestrator.circuit_report import CircuitsResult

        if self._resumed_lost:
            lost, self._resumed_lost = self._resumed_lost, []
            logger.warning(
                "circuits of steps %s were in flight at the checkpoint; measuring step %d instead", lost, step
            )
        started = time.perf_counter()
        self._context.regulariser.recording = False  # nobody reads C of these passes (train_step turns it back)
        partitions, source = self._partitions()
        circuits, skipped = {}, {}
        for name, find, judge in self._task_batches():
            try:
                circuits[name] = self._circuit(find, judge, partitions)
            except ValueError as error:  # raised on every rank alike: each pass is a collective
                skipped[f"attribution {name}"] = str(error)
        summaries = {name: mask_summary_rows(self._context.engine, circuit) for name, circuit in circuits.items()}
        if not self._context.rank.leads:
            return
        k = max((p.k for p in (partitions or {}).values()), default=self._spec.modularity.k)
        names = tuple(name for name, _, _ in self._batches)
        result = CircuitsResult(names, source, k, attribution=circuits, skipped=skipped)
        self._log(step, result, summaries, time.perf_counter() - started)

    def _circuit(self, find: list, judge: list | None, partitions) -> AttributionCircuit:
        from orchestrator.circuit_report import model_kind
        from orchestrator.circuit_tasks import classifier_metric, language_metric
        from orchestrator.sharded_attribution import sharded_attribution_circuit

        options = self._spec.circuits
        return sharded_attribution_circuit(
            self._context.engine,
            find,
            classifier_metric if model_kind(self._spec) == "classifier" else language_metric,
            ig_steps=options.ig_steps,
            taus=options.taus,
            eval_batches=judge,
            partition=partitions,
        )

    def _partitions(self) -> tuple[dict | None, str]:
        training = self._context.partitions()
        if training is None or self._spec.modularity.lambda_ == 0:
            return None, NO_PARTITION
        return dict(training), "training"

    def _task_batches(self) -> list[TaskBatches]:
        """The tasks actor's batches, fetched once: every rank gets the same."""
        import ray

        if self._batches is None:
            self._batches = ray.get(ray.get_actor(self._context.actor_names[0]).batches.remote())
        return self._batches

    def _log(self, step: int, result, summaries: dict[str, list[dict]], seconds: float) -> None:
        from orchestrator.circuit_report import format_table, parquet_rows, result_metrics

        artifacts = {"circuits.txt": (format_table(result) + "\n").encode()}
        artifacts |= {f"circuits/attribution/{task}.parquet": parquet_rows(rows) for task, rows in summaries.items()}
        log_measurement(self._context.logger, step, result_metrics(result), seconds, artifacts, result.skipped)


def mask_summary_rows(engine, circuit: AttributionCircuit) -> list[dict[str, Any]]:
    """Per τ and scoped matrix, the rows ``xcm circuits`` writes from a whole mask (matrix, kept, size, share,
    locality, tau), from every rank's kept count summed in one all-reduce and the circuit's global locality blocks;
    every rank must call it."""
    from orchestrator.circuit_report import summary_row
    from orchestrator.sharded_attribution import all_sum

    parameters = dict(engine.module.named_parameters())
    cells = [(tau, name) for tau, mask in circuit.masks.items() for name in mask]
    kept = all_sum(torch.tensor([int(circuit.masks[tau][name].sum()) for tau, name in cells], dtype=torch.int64))
    return [
        summary_row(
            name, count, parameters[name].ds_numel, circuit.locality[tau].blocks.get(name) if circuit.locality else None
        )
        | {"tau": tau}
        for (tau, name), count in zip(cells, kept.tolist(), strict=True)
    ]

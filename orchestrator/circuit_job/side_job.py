"""Circuits as a side job: every ``circuits.every_steps`` steps and after the last one, rank 0 hands the
gathered weights and the training partition to the circuits actor and goes on; the answers are logged at
the step they were computed for, when they come back. As for every "every N steps" metric, the weights after
N completed steps are logged at step index N - 1, the trained ones at the last index. Only the last measurement
is awaited (``FINAL_TIMEOUT_S`` at most), so that it reaches MLflow before the run ends.

Its checkpoint state (``xcm/circuits.json``) is the steps still in flight: their weights are not kept, so a
run resumed from that checkpoint measures the weights it starts from instead, logged at the step before its
first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.circuit_job.measurement_log import log_measurement
from orchestrator.gather import Gathered, Needs
from orchestrator.spec import JobSpec, SpecProblem

if TYPE_CHECKING:
    from orchestrator.circuit_job.actor import CircuitsAnswer
    from orchestrator.circuit_job.on_ranks import RanksCircuitsJob
    from orchestrator.models.dimensions import ModelDimensions
    from orchestrator.modularity import GroupPartition
    from orchestrator.ranks import Rank
    from orchestrator.side_jobs import SideJobContext
    from orchestrator.tracking import MetricLogger

logger = logging.getLogger(__name__)

FINAL_TIMEOUT_S = 600.0  # the end of the run waits this long at most for the last measurements


class CircuitsKind:
    name = "circuits"

    @staticmethod
    def enabled(spec: JobSpec) -> bool:
        return spec.circuits.every_steps > 0

    @staticmethod
    def spec_problems(spec: JobSpec, dimensions: ModelDimensions | None) -> list[SpecProblem]:
        """The method must suit the model: greedy is for the small classifiers, not a language model; and
        attribution on the ranks must suit the job."""
        from orchestrator.circuit_report import job_problems

        return [
            SpecProblem(
                key="circuits.method",
                message=message,
                fix="set circuits.method: attribution (or specialization, or all)",
            )
            for message in job_problems(spec)
        ] + on_ranks_problems(spec)

    @staticmethod
    def start_actors(spec: JobSpec) -> dict[str, Any]:
        from orchestrator.circuit_job.actor import start_circuits_actor, start_tasks_actor

        return start_tasks_actor(spec) if spec.circuits.attribution_on == "ranks" else start_circuits_actor(spec)

    @staticmethod
    def build(spec: JobSpec, context: SideJobContext) -> CircuitsJob | RanksCircuitsJob:
        if spec.circuits.attribution_on == "ranks":
            from orchestrator.circuit_job.on_ranks import RanksCircuitsJob

            return RanksCircuitsJob(spec, context)
        return CircuitsJob(
            spec.circuits.every_steps,
            spec.training.steps,
            context.rank,
            context.actor_names,
            context.partitions,
            context.logger,
        )


CIRCUITS = CircuitsKind()


def on_ranks_problems(spec: JobSpec) -> list[SpecProblem]:
    """``attribution_on: ranks`` scores ZeRO-3's partitions with the training optimizer's own gradient
    partitions (proven in fp32 and bf16), and computes attribution only: each problem names the key to change."""
    circuits, deepspeed = spec.circuits, spec.deepspeed
    if circuits.attribution_on != "ranks" or circuits.every_steps == 0:
        return []
    problems = []
    if deepspeed.zero_stage != 3:
        problems.append(
            SpecProblem(
                key="circuits.attribution_on",
                message=f"ranks scores ZeRO-3's weight partitions, but deepspeed.zero_stage is {deepspeed.zero_stage}, "
                "where every rank holds the whole model and the actor gathers nothing a rank lacks",
                fix="set deepspeed.zero_stage: 3, or circuits.attribution_on: actor",
            )
        )
    if deepspeed.offload_optimizer:
        problems.append(
            SpecProblem(
                key="circuits.attribution_on",
                message="ranks reads each pass's gradient partitions, which deepspeed.offload_optimizer moves to the "
                "CPU only at a step's end",
                fix="set deepspeed.offload_optimizer: false, or circuits.attribution_on: actor",
            )
        )
    if spec.training.precision == "fp16":
        problems.append(
            SpecProblem(
                key="circuits.attribution_on",
                message="ranks is proven in fp32 and bf16 only: under training.precision fp16 the gradient "
                "partitions carry the dynamic loss scale, at which they overflow or underflow",
                fix="set training.precision: bf16 (or fp32), or circuits.attribution_on: actor",
            )
        )
    methods = [circuits.method] if isinstance(circuits.method, str) else list(circuits.method)
    if methods != ["attribution"]:
        problems.append(
            SpecProblem(
                key="circuits.method",
                message=f"{circuits.method} with circuits.attribution_on: ranks; the ranks compute attribution only "
                "(greedy and specialization need whole matrices, which ranks never gathers)",
                fix="set circuits.method: attribution, or circuits.attribution_on: actor",
            )
        )
    return problems


@dataclass
class _InFlight:
    step: int
    answer: Any  # rank 0: the ObjectRef of a CircuitsAnswer


class CircuitsJob:
    """One rank's side: every rank gathers at the same steps; rank 0 alone talks to the actor and logs."""

    def __init__(
        self,
        every_steps: int,
        last_step: int,
        rank: Rank,
        actor_names: list[str],
        partitions: Callable[[], Mapping[str, GroupPartition] | None],
        metric_logger: MetricLogger | None,
    ):
        self._every, self._end = every_steps, last_step
        self._rank, self._actor_names, self._partitions = rank, list(actor_names), partitions
        self._logger = metric_logger
        self._actor = None
        self._in_flight: list[_InFlight] = []
        self._resumed_lost: list[int] = []  # steps in flight at the checkpoint a run resumed from

    def due(self, step: int) -> bool:
        return (step > 0 and step % self._every == 0) or bool(self._resumed_lost)

    @staticmethod
    def needs() -> Needs:
        """Every parameter, each put into the object store as it is gathered: rank 0 holds one at a time."""
        return Needs(model=True, stream_model=True)

    def submit(self, step: int, gathered: Gathered | None) -> None:
        """Before step index `step`, `step` steps are done: their weights are measured for index `step - 1`."""
        self._send(step - 1, gathered)

    def _send(self, step: int, gathered: Gathered | None) -> None:
        if self._resumed_lost:
            logger.warning(
                "circuits of steps %s were in flight at the checkpoint; measuring step %d instead",
                self._resumed_lost,
                step,
            )
            self._resumed_lost = []
        if not self._rank.leads:
            return
        current = self._partitions()
        partitions = None if current is None else {name: p.to_dict() for name, p in current.items()}
        parameters = gathered.model  # name -> ObjectRef, fetched by the actor one at a time
        self._in_flight.append(_InFlight(step, self._circuits_actor().compute.remote(step, parameters, partitions)))

    def collect(self, step: int) -> None:
        """Log every answer that has come in; never waits."""
        if not self._rank.leads or not self._in_flight:
            return
        import ray

        references = [request.answer for request in self._in_flight]
        done, _ = ray.wait(references, num_returns=len(references), timeout=0, fetch_local=False)
        self._take(done)

    def finish(self, gathered: Gathered | None) -> None:
        """The trained weights' circuits, logged at the last step index; waits for every answer, boundedly."""
        self._send(self._end - 1, gathered)
        if not self._rank.leads:
            return
        import ray

        references = [request.answer for request in self._in_flight]
        done, late = ray.wait(references, num_returns=len(references), timeout=FINAL_TIMEOUT_S)
        self._take(done)
        if late:
            logger.warning(
                "circuits of steps %s did not come back within %.0f s; not logged",
                [request.step for request in self._in_flight],
                FINAL_TIMEOUT_S,
            )

    def state_dict(self) -> dict | None:
        steps = [request.step for request in self._in_flight]
        return {"in_flight": steps} if steps else None

    def load_state_dict(self, state: dict | None) -> None:
        self._resumed_lost = [int(step) for step in (state or {}).get("in_flight", [])]

    def _take(self, done: list) -> None:
        import ray

        finished = set(done)
        for request in [r for r in self._in_flight if r.answer in finished]:
            self._in_flight.remove(request)
            try:
                self._log(ray.get(request.answer))
            except Exception as error:  # the actor failed for good: this measurement is lost, training goes on
                logger.warning("circuits of step %d failed: %s", request.step, error)

    def _log(self, answer: CircuitsAnswer) -> None:
        log_measurement(self._logger, answer.step, answer.metrics, answer.seconds, answer.artifacts, answer.skipped)

    def _circuits_actor(self):
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self._actor_names[0])
        return self._actor

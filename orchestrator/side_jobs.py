"""Work beside the training loop: the interface every side job implements, and what a rank gives it.

A side job (the partitioner today; circuit metrics next) reads the model's weights at some steps, hands them to
Ray actors of its own and goes on without waiting; its answers come back at later step boundaries, where it
adopts them into training (the partitioner's labels) or logs them at the step they were computed for. Every
rank holds the same side jobs and calls them at the same points, since gathers and adoptions are collectives:

- before each step, ``collect(step)`` (adopt or log what has come back), then, when ``due(step)``, the weights
  it ``needs()`` are gathered (``orchestrator.gather``) and passed to ``submit(step, gathered)``, which returns
  at once (rank 0 gets the copy, the other ranks None), unless the job computes on the ranks themselves (circuits'
  ``attribution_on: ranks``: nothing gathered, the engine from its context, training paused while it runs);
- at each checkpoint, ``state_dict()`` (JSON values: its adopted results and its work in flight), restored with
  ``load_state_dict`` on resume;
- after the last step, ``finish(gathered)`` with a last gather of what it needs.

A job's ``SideJobKind`` says whether the spec enables it, checks its own spec section, starts its actors on the
driver and builds the job on each rank; ``orchestrator.train.side_job_registry`` lists the kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.gather import Gathered, Needs

if TYPE_CHECKING:
    import torch

    from orchestrator.models.dimensions import ModelDimensions
    from orchestrator.modularity import ClusterabilityRegulariser, GroupPartition, MatrixGroup
    from orchestrator.ranks import Rank
    from orchestrator.spec import JobSpec, SpecProblem
    from orchestrator.tracking import MetricLogger


class SideJob(Protocol):
    """One rank's side of a side job; every rank calls each method at the same step (they may be collectives)."""

    def due(self, step: int) -> bool:
        """Whether to gather and submit before `step`."""

    def needs(self) -> Needs:
        """What is gathered for it when it is due, and at the end."""

    def submit(self, step: int, gathered: Gathered | None) -> None:
        """Hand the weights of `step` to the actors without waiting (rank 0 has `gathered`; the others None)."""

    def collect(self, step: int) -> None:
        """At the boundary before `step`: adopt or log whatever the actors have answered; never blocks unless
        the job's own schedule says this step waits."""

    def state_dict(self) -> Any:
        """What a checkpoint keeps, as JSON values (None: nothing yet); rank 0's is the one kept."""

    def load_state_dict(self, state: Any) -> None:
        """Continue from `state_dict()`'s output."""

    def finish(self, gathered: Gathered | None) -> None:
        """After the last step, with the trained weights it needs: its last results, and no work left running."""


@dataclass(frozen=True)
class SideJobContext:
    """What a rank gives each side job it builds."""

    rank: Rank
    device: torch.device
    groups: Sequence[MatrixGroup]  # the regularised matrices
    regulariser: ClusterabilityRegulariser  # where adopted partitions go
    actor_names: Sequence[str]  # the Ray names of the actors its kind started on the driver
    logger: MetricLogger | None  # rank 0's MLflow logger; None on the other ranks
    # the training partition every rank uses now (by group name; None before the first), for jobs that read it
    partitions: Callable[[], Mapping[str, GroupPartition] | None] = lambda: None
    # the rank's DeepSpeed engine, for a job that computes on the training ranks' own shards between steps
    # instead of gathering weights for an actor (circuits' attribution_on: ranks)
    engine: Any = None


class SideJobKind(Protocol):
    """A side job as the driver and the job checks see it; ``name`` also names its state in checkpoints."""

    name: str

    def enabled(self, spec: JobSpec) -> bool:
        """Whether `spec` runs this side job."""

    def spec_problems(self, spec: JobSpec, dimensions: ModelDimensions | None) -> list[SpecProblem]:
        """Its own section's problems, also against the rest of the spec and the model's sizes (when known)."""

    def start_actors(self, spec: JobSpec) -> dict[str, Any]:
        """Driver: start its actors, by their unique Ray names; the driver kills them when the job ends."""

    def build(self, spec: JobSpec, context: SideJobContext) -> SideJob:
        """Each rank: the job, given its spec sections and the rank's context."""


def step_boundary(job: SideJob, step: int, gather: Callable[[Needs], Gathered | None]) -> None:
    """What every rank does for `job` before `step`: take in its answers, then, when due, gather and submit."""
    job.collect(step)
    if job.due(step):
        job.submit(step, gather(job.needs()))

"""The partitioner as a side job: the first ``SideJobKind``, and the checks of its spec sections.

Every run trains with a partition (a control run with lambda 0 still reports C under one), so the kind is
always enabled; its state in checkpoints is named ``partition`` (``xcm/partition.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.spec import JobSpec, ModularitySpec, PartitionerSpec, SpecProblem

if TYPE_CHECKING:
    from orchestrator.models.dimensions import ModelDimensions
    from orchestrator.partitioning.schedule import PartitionSchedule
    from orchestrator.side_jobs import SideJobContext


class PartitioningKind:
    name = "partition"

    @staticmethod
    def enabled(spec: JobSpec) -> bool:
        return True

    @staticmethod
    def spec_problems(spec: JobSpec, dimensions: ModelDimensions | None) -> list[SpecProblem]:
        """The first partition comes before the last step; a fixed adoption lag fits the recomputation
        interval; no actor is left without a layer to co-cluster."""
        modularity, partitioner = spec.modularity, spec.partitioner
        problems = []
        if modularity.partition_at_step >= spec.training.steps:
            problems.append(
                SpecProblem(
                    key="modularity.partition_at_step",
                    message=f"{modularity.partition_at_step} is not before the last step ({spec.training.steps})",
                    fix=f"choose a step below training.steps={spec.training.steps}",
                )
            )
        problems += _adoption_problems(modularity, partitioner)
        if dimensions is not None and partitioner.actors > dimensions.layers:
            problems.append(
                SpecProblem(
                    key="partitioner.actors",
                    message=f"{partitioner.actors} actors for {dimensions.layers} MLP layers would leave some idle",
                    fix=f"set partitioner.actors <= {dimensions.layers}",
                )
            )
        return problems

    @staticmethod
    def start_actors(spec: JobSpec) -> dict[str, Any]:
        from orchestrator.partitioning.actor import start_partitioners

        return start_partitioners(spec.modularity, spec.partitioner)

    @staticmethod
    def build(spec: JobSpec, context: SideJobContext) -> PartitionSchedule:
        from orchestrator.partitioning.schedule import PartitionSchedule

        return PartitionSchedule(
            context.groups,
            context.regulariser,
            spec.modularity,
            spec.partitioner,
            context.rank,
            context.device,
            context.actor_names,
            context.logger,
        )


PARTITIONING = PartitioningKind()


def _adoption_problems(modularity: ModularitySpec, partitioner: PartitionerSpec) -> list[SpecProblem]:
    """A fixed adoption lag applies to recomputed partitions, and must not hold up the next request."""
    lag, every = partitioner.adopt_after_steps, modularity.partition_every
    if lag == 0:
        return []
    if every == 0:
        return [
            SpecProblem(
                key="partitioner.adopt_after_steps",
                message=f"{lag} applies to recomputed partitions, and modularity.partition_every is 0 (the one "
                "partition is always awaited at partition_at_step)",
                fix="set modularity.partition_every > 0, or partitioner.adopt_after_steps: 0",
            )
        ]
    if lag > every:
        return [
            SpecProblem(
                key="partitioner.adopt_after_steps",
                message=f"{lag} is more than modularity.partition_every={every}: no request goes out before the "
                f"previous adoption, so versions would come every {lag} steps, not every {every}",
                fix=f"choose partitioner.adopt_after_steps <= {every}, or raise modularity.partition_every",
            )
        ]
    return []

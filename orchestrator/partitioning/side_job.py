"""The partitioner as a side job: the first ``SideJobKind``.

Every run trains with a partition (a control run with lambda 0 still reports C under one), so the kind is
always enabled; its state in checkpoints is named ``partition`` (``xcm/partition.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.spec import JobSpec

if TYPE_CHECKING:
    from orchestrator.partitioning.schedule import PartitionSchedule
    from orchestrator.side_jobs import SideJobContext


class PartitioningKind:
    name = "partition"

    @staticmethod
    def enabled(spec: JobSpec) -> bool:
        return True

    @staticmethod
    def start_actors(spec: JobSpec) -> dict[str, Any]:
        from orchestrator.partitioning.actor import start_partitioners

        return start_partitioners(spec.modularity, spec.partitioner)

    @staticmethod
    def build(spec: JobSpec, context: SideJobContext) -> PartitionSchedule:
        from orchestrator.partitioning.schedule import PartitionSchedule

        return PartitionSchedule(context.groups, context.regularizer, spec.modularity, spec.partitioner,
                                 context.rank, context.device, context.actor_names, context.logger)


PARTITIONING = PartitioningKind()


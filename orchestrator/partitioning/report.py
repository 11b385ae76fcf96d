"""Rank 0's MLflow view of partition versions: metrics at each adoption, the partition as Parquet, heatmaps.

All of it goes through the MetricLogger's queues: its artifact thread writes the Parquet table and uploads the
PNGs (drawn by the partitioner actors, or, for the end of training, by the artifact thread itself), so a new
version costs the training step only the enqueuing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from orchestrator import metric_names
from orchestrator.gather import GroupSnapshot
from orchestrator.modularity import GroupPartition, MatrixGroup
from orchestrator.partitioning.actor import PartitionerPool, PartitionRequest, PartitionShare, draw_heatmaps
from orchestrator.partitioning.table import partition_table
from orchestrator.tracking import MetricLogger

PARTITIONS_DIRECTORY = "partitions"  # partitions/partition-step<adoption step>.parquet, one per version
HEATMAPS_DIRECTORY = "heatmaps"  # heatmaps/version-<n>/<matrix>.png and heatmaps/final/<matrix>.png


class PartitionReport:
    """Logs what a user wants to see of each partition version, on rank 0 only."""

    def __init__(self, logger: MetricLogger, groups: Sequence[MatrixGroup]):
        self._logger = logger
        self._groups = list(groups)

    def adopted(
        self,
        version: int,
        step: int,
        requested_at: int,
        partitions: dict[str, GroupPartition],
        shares: Sequence[PartitionShare],
        request: PartitionRequest | None,
        waited_s: float,
    ) -> None:
        """Version metrics at the adoption step, the partition as Parquet, and the heatmaps the actors draw
        (none when `request` is None: a version restored from a checkpoint, asked for by the interrupted run)."""
        agreement = {name: value for share in shares for name, value in share.agreement.items()}
        metrics = {
            metric_names.PARTITION_VERSION: version,
            metric_names.PARTITION_LAG_STEPS: step - requested_at,
            metric_names.PARTITION_SECONDS: max(share.seconds for share in shares),
            metric_names.PARTITION_WAIT_SECONDS: waited_s,
        }
        if agreement:
            metrics[metric_names.PARTITION_AGREEMENT] = sum(agreement.values()) / len(agreement)
            metrics.update({metric_names.partition_agreement(name): value for name, value in agreement.items()})
        for name, partition in partitions.items():
            sizes = torch.bincount(partition.hidden, minlength=partition.k).tolist()
            metrics.update(
                {metric_names.partition_cluster_size(name, cluster): size for cluster, size in enumerate(sizes)}
            )
        self._logger.log(metrics, step)
        self._logger.log_artifacts_from(
            lambda directory: self._write_table(directory / f"partition-step{step}.parquet", version, partitions),
            PARTITIONS_DIRECTORY,
        )
        if request is not None and request.heatmaps:
            self._logger.log_artifacts_from(
                lambda directory: _write_pictures(directory, PartitionerPool.collect_heatmaps(request)),
                f"{HEATMAPS_DIRECTORY}/version-{version}",
            )

    def final(self, snapshot: dict[str, GroupSnapshot], partitions: dict[str, GroupPartition]) -> None:
        """Heatmaps of the trained matrices under the last partition, drawn off the training loop."""
        as_dicts = {name: partition.to_dict() for name, partition in partitions.items()}
        self._logger.log_artifacts_from(
            lambda directory: _write_pictures(directory, draw_heatmaps(snapshot, as_dicts)),
            f"{HEATMAPS_DIRECTORY}/final",
        )

    def _write_table(self, path: Path, version: int, partitions: dict[str, GroupPartition]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = partition_table(self._groups, partitions)
        pq.write_table(table.append_column("version", pa.array([version] * table.num_rows, pa.int32())), path)


def _write_pictures(directory: Path, pictures: dict[str, bytes]) -> None:
    for name, png in pictures.items():
        (directory / f"{name}.png").write_bytes(png)

"""What rank 0 tells the user while it trains, as notes on the progress board (``orchestrator.train.progress``):
each partition version and each circuits measurement as it is logged, and xcm's own warnings. Worker output
reaches the driver only in the log file by default, so these are the worker-side lines the terminal shows.

Nothing here runs per step: a note is one fire-and-forget call, a few per run.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping

from orchestrator import metric_names

PACKAGE_LOGGER = "orchestrator"


class BoardWarnings(logging.Handler):
    """xcm's warnings on rank 0 (a partition that failed, MLflow out of reach, circuits skipped) as board notes."""

    def __init__(self, board):
        super().__init__(logging.WARNING)
        self._board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._board.note.remote(f"warning: {record.getMessage()}")
        except Exception:  # the board is gone (the run is ending): the warning is still in the log file
            self.handleError(record)


def forward_warnings(board) -> BoardWarnings:
    """Install the handler on xcm's package logger; the caller removes it (``stop_forwarding``) when done."""
    handler = BoardWarnings(board)
    logging.getLogger(PACKAGE_LOGGER).addHandler(handler)
    return handler


def stop_forwarding(handler: BoardWarnings) -> None:
    logging.getLogger(PACKAGE_LOGGER).removeHandler(handler)


class AnnouncingLogger:
    """Rank 0's metric logger as the side jobs hold it: what they log goes to MLflow as before, and a partition
    version or a circuits measurement among it also goes to the board as one line. The training loop's own
    per-step logging does not pass through here."""

    def __init__(self, logger, board):
        self._logger = logger
        self._board = board

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._logger.log(metrics, step)
        line = announcement(metrics, step)
        if line is not None:
            self._board.note.remote(line)

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


def announcement(metrics: Mapping[str, float], step: int) -> str | None:
    """The line a user sees for metrics a side job logged at step index ``step``; None for any others."""
    if metric_names.PARTITION_VERSION in metrics:
        return partition_line(metrics, step)
    if any(key.startswith(("circuits/", "specialization/")) for key in metrics):
        return circuits_line(metrics, step)
    if metric_names.WORKERS in metrics:
        return workers_line(metrics, step)
    return None


def workers_line(metrics: Mapping[str, float], step: int) -> str:
    """An elastic group's size from step index ``step`` on, and the size it resized from."""
    workers = int(metrics[metric_names.WORKERS])
    if metric_names.RESIZED_FROM in metrics:
        return f"resized from {int(metrics[metric_names.RESIZED_FROM])} to {workers} workers at step {step + 1}"
    return f"elastic group of {workers} workers from step {step + 1}"


def partition_line(metrics: Mapping[str, float], step: int) -> str:
    version = int(metrics[metric_names.PARTITION_VERSION])
    line = f"partition v{version} in use from step {step + 1}"
    details = []
    if metric_names.PARTITION_SECONDS in metrics:
        details.append(f"computed in {metrics[metric_names.PARTITION_SECONDS]:.1f} s")
    if metric_names.PARTITION_AGREEMENT in metrics:
        details.append(f"agreement with v{version - 1} {metrics[metric_names.PARTITION_AGREEMENT]:.2f} (ARI)")
    return line + (f" ({', '.join(details)})" if details else "")


def circuits_line(metrics: Mapping[str, float], step: int) -> str:
    """Circuits of the weights after step ``step + 1``: the specialization index against its null, and the mean
    circuit size and locality over the tasks; details are in the run's artifacts."""
    parts = []
    if metric_names.SPECIALIZATION_INDEX in metrics:
        index = f"specialization index {metrics[metric_names.SPECIALIZATION_INDEX]:.3f}"
        if metric_names.SPECIALIZATION_INDEX_Z in metrics:
            index += f" (z {metrics[metric_names.SPECIALIZATION_INDEX_Z]:.1f})"
        parts.append(index)
    for label, prefix in (("size", "circuits/size/"), ("locality", "circuits/locality/")):
        values = [value for key, value in metrics.items() if key.startswith(prefix) and "/tau" not in key]
        if values:
            parts.append(f"mean circuit {label} {statistics.fmean(values):.3f} over {len(values)} tasks")
    return f"circuits at step {step + 1}: " + ("; ".join(parts) if parts else "measured (see the run's artifacts)")

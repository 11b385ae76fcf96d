"""How a circuits measurement reaches MLflow, the same from the actor's answers and from the training ranks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.tracking import MetricLogger

logger = logging.getLogger(__name__)


def log_measurement(
    metric_logger: MetricLogger,
    step: int,
    metrics: Mapping[str, float],
    seconds: float,
    artifacts: Mapping[str, bytes],
    skipped: Mapping[str, str],
) -> None:
    """Rank 0: one measurement's finite metrics and ``circuits/seconds`` at `step`, its artifacts under
    ``circuits/step-<step>/``, and a warning for each method and task skipped; both paths log through it."""
    import math

    finite = {key: float(value) for key, value in metrics.items() if math.isfinite(value)}
    metric_logger.log(finite | {"circuits/seconds": seconds}, step)

    def write(directory) -> None:
        for path, data in artifacts.items():
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            (directory / path).write_bytes(data)

    metric_logger.log_artifacts_from(write, f"circuits/step-{step}")
    for what, why in skipped.items():
        logger.warning("circuits of step %d: %s skipped: %s", step, what, why)

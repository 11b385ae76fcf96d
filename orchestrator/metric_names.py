"""Metric names in one place, so the trainer, the dashboards and the tests agree."""

LOSS = "loss"
TASK_LOSS = "task_loss"
CLUSTERABILITY = "clusterability"
CLUSTERABILITY_MASS_WEIGHTED = "clusterability/mass_weighted"
CLUSTERABILITY_NORMALISED = "clusterability/normalised"
CLUSTERABILITY_LAYER_PREFIX = "clusterability/"
TOKENS_PER_SECOND = "tokens_per_s"
STEP_TIME = "step_time_s"
LEARNING_RATE = "lr"
PARTITION_SECONDS = "partition/seconds"


def layer_clusterability(matrix_name: str) -> str:
    """The per-matrix metric, e.g. ``clusterability/transformer.h.0.mlp.c_fc``."""
    return CLUSTERABILITY_LAYER_PREFIX + matrix_name

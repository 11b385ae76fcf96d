"""Metric names in one place, so the trainer, the dashboards and the tests agree."""

LOSS = "loss"
TASK_LOSS = "task_loss"
CLUSTERABILITY = "clusterability"
CLUSTERABILITY_MASS_WEIGHTED = "clusterability/mass_weighted"
CLUSTERABILITY_NORMALISED = "clusterability/normalised"
CLUSTERABILITY_LAYER_PREFIX = "clusterability/"
TOKENS_PER_SECOND = "tokens_per_s"
SAMPLES_PER_SECOND = "samples_per_s"  # classifiers: images or modular-addition prompts per second, all workers
STEP_TIME = "step_time_s"  # mean over the steps since the last logged one (as are the rates and MFU)
MFU = "mfu"  # model FLOPs per second over the workers' peak FLOP/s (orchestrator.train.throughput)
PEAK_MEMORY_MAX = "memory/peak_gib/max"  # the largest worker's peak: CUDA memory allocated, or RSS on CPU
ACCURACY = "accuracy"  # classifiers: share of the step's training examples classified right
LEARNING_RATE = "lr"
CIRCUITS_EXPERIMENT = "xcm-circuits"  # the MLflow experiment of `xcm circuits` runs, unless --experiment
LOSS_SCALE = "fp16/loss_scale"  # fp16 runs: DeepSpeed's dynamic loss scale after the step
SKIPPED_STEPS = "fp16/skipped_steps"  # fp16 runs: optimizer steps skipped on overflow since the run began
PARTITION_SECONDS = "partition/seconds"  # the partitioner's time to compute a version (slowest actor)
PARTITION_VERSION = "partition/version"  # logged at the step every rank adopted that version
PARTITION_AGREEMENT = "partition/ari_prev"  # adjusted Rand index with the previous version, mean over groups
PARTITION_LAG_STEPS = "partition/lag_steps"  # steps from the request to the adoption
PARTITION_WAIT_SECONDS = "partition/wait_seconds"  # how long the adoption step waited for the actors
EVAL_PREFIX = "eval/"
EVAL_LOSS = EVAL_PREFIX + LOSS  # mean token (text) or example (classifiers) loss on the validation split, all ranks
EVAL_PERPLEXITY = "eval/perplexity"  # text: exp(eval/loss)
EVAL_ACCURACY = EVAL_PREFIX + ACCURACY  # classifiers: share of the validation examples classified right, all ranks
EVAL_TASK_LOSS_PREFIX = "eval/loss/"
RESUMED_FROM_STEP = "checkpoint/resumed_from_step"  # logged at the step a restarted or resumed run continued at
WORKERS = "resources/workers"  # an elastic run's worker count, logged at the first step of each worker group
RESIZED_FROM = "resources/resized_from"  # beside WORKERS when the group continues a checkpoint of another count


def layer_clusterability(matrix_name: str) -> str:
    """The per-matrix metric, e.g. ``clusterability/transformer.h.0.mlp.c_fc``."""
    return CLUSTERABILITY_LAYER_PREFIX + matrix_name


def layer_clusterability_normalised(matrix_name: str) -> str:
    """The per-matrix normalised C, (C - b) / (1 - b), e.g. ``clusterability/normalised/transformer.h.0.mlp.c_fc``."""
    return f"{CLUSTERABILITY_NORMALISED}/{matrix_name}"


def partition_agreement(group_name: str) -> str:
    """One group's adjusted Rand index with the previous version, e.g. ``partition/ari_prev/transformer.h.0.mlp``."""
    return f"{PARTITION_AGREEMENT}/{group_name}"


def partition_cluster_size(group_name: str, cluster: int) -> str:
    """Hidden neurons in one cluster of a group, e.g. ``partition/cluster_size/transformer.h.0.mlp/2``."""
    return f"partition/cluster_size/{group_name}/{cluster}"


def worker_peak_memory(rank: int) -> str:
    """One worker's peak memory in GiB, e.g. ``memory/peak_gib/rank1``."""
    return f"memory/peak_gib/rank{rank}"


def eval_task_loss(task: str) -> str:
    """One synthetic task's validation loss, e.g. ``eval/loss/add``."""
    return EVAL_TASK_LOSS_PREFIX + task


def eval_metric(set_name: str, metric: str) -> str:
    """An objective's metric on an evaluation set named by its loss: ``accuracy`` on ``eval/loss`` is
    ``eval/accuracy``; ``loss`` keeps the set's name (``eval/loss/add``)."""
    return set_name.replace(EVAL_LOSS, EVAL_PREFIX + metric, 1)


def measured_clusterability(variant: str, matrix_name: str | None = None) -> str:
    """``xcm measure``'s C under one partition variant, for one matrix or (no name) the model mean; step = k."""
    return f"measure/{variant}" + (f"/{matrix_name}" if matrix_name else "")


SPECIALIZATION_INDEX = "specialization/index"  # xcm circuits: normalised mutual information of clusters and tasks
SPECIALIZATION_INDEX_NULL_MEAN = "specialization/index_null_mean"  # its mean under random same-size partitions
SPECIALIZATION_INDEX_Z = "specialization/index_z"  # (index − null mean) / null sd


def circuit_size(task: str, tau: float | None = None) -> str:
    """A task's circuit size (kept share of the scoped weights), e.g. ``circuits/size/add``; attribution's at
    one faithfulness level, e.g. ``circuits/size/add/tau0.9``."""
    return f"circuits/size/{task}" + (f"/tau{tau:g}" if tau is not None else "")


def circuit_locality(task: str) -> str:
    """Share of a task's circuit inside the partition's diagonal blocks, e.g. ``circuits/locality/add``."""
    return f"circuits/locality/{task}"


def specialization_concentration(task: str) -> str:
    """How much a task relies on one cluster, e.g. ``specialization/concentration/add``."""
    return f"specialization/concentration/{task}"

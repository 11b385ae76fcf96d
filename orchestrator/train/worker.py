"""The per-rank training loop that every Ray Train worker runs.

Runbook: the driver (``orchestrator.train.launch``) starts N workers with the resolved spec; each builds the
same random model and its own shard of the data, wraps the model in a DeepSpeed engine at the spec's ZeRO
stage, and trains with ``task_loss - lambda * mean C``. The partitioner actors compute the partition from
matrices rank 0 gathers (a collective under ZeRO-3), and every rank adopts each version at the same step
(``orchestrator.partitioning.schedule``); rank 0 alone logs to MLflow and posts progress. Every rank
calls ``ray.train.report`` at the same steps: it is a barrier. A session that starts from a checkpoint (a
restart after a failure, or ``xcm resume``) continues at its step, data position and partition
(``orchestrator.train.checkpointing``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from orchestrator import metric_names
from orchestrator.spec import JobSpec

# The driver redraws the progress line every 0.5 s at most: posting more often only costs the trainers' CPU.
PROGRESS_POST_INTERVAL_S = 0.25


def train_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` carries the resolved spec, the MLflow run id and the progress actor name."""
    spec = JobSpec.model_validate(config["spec"])
    # Set before deepspeed is imported: it picks its accelerator once, at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.resources.use_gpu else "cpu")
    import ray.train

    from orchestrator.train.preflight import require_precision_support

    require_precision_support(spec)  # a GPU without bf16 fails here, not deep inside DeepSpeed
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    session = TrainingSession(spec, rank, world_size, config["run_id"], config.get("progress_actor"),
                              config.get("resume_from"), config.get("partitioners", ()), config["session"],
                              config.get("checkpoint_key_id"))
    try:
        session.run()
    finally:
        session.close()


class TrainingSession:
    """One rank's engine, data stream, regulariser and (on rank 0) logger, stepped from ``run``."""

    def __init__(self, spec: JobSpec, rank: int, world_size: int, run_id: str, progress_actor: str | None,
                 resume_from: str | None = None, partitioners: Sequence[str] = (), launch_session: str = "",
                 checkpoint_key_id: str | None = None):
        from orchestrator.data import build_training_data
        from orchestrator.models import build_model
        from orchestrator.modularity import ClusterabilityRegularizer, find_matrix_groups
        from orchestrator.train.checkpointing import CheckpointManager
        from orchestrator.train.engine import build_engine
        from orchestrator.train.objectives import objective_for
        from orchestrator.partitioning.schedule import PartitionSchedule
        from orchestrator.train.throughput import throughput_meter
        from orchestrator.train.evaluation import Evaluator, evaluation_sets

        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.is_rank_zero = rank == 0
        data = build_training_data(spec.data, spec.model)  # the driver built it first: a token-cache read here
        self.objective = objective_for(spec)  # next-token prediction, or classification (images, modular addition)
        model = build_model(spec.model, data.vocab_size, seed=spec.training.seed)
        flops = self.objective.model_flops(model, data.train)  # counted before ZeRO shards the weights
        self.engine = build_engine(model, spec, world_size)
        self.throughput = throughput_meter(spec, flops, world_size, self.objective.unit, self.engine.device)
        self.groups = find_matrix_groups(self.engine.module, spec.modularity.matrices)
        # lambda 0 (a control run) still reports C, computed without autograd at the steps that read it. Outside
        # ZeRO-3 the weights stay whole after each forward, so C is computed for all matrices at once, batched.
        self.regularizer = ClusterabilityRegularizer(differentiable=spec.modularity.lambda_ > 0,
                                                     weights_persist=spec.deepspeed.zero_stage < 3)
        self.logger = self.progress = None
        self.last_progress_post = float("-inf")
        if self.is_rank_zero:
            from orchestrator.tracking import MetricLogger
            from orchestrator.train.checkpoint_store import metric_spool_path

            self.logger = MetricLogger(spec.tracking.uri, run_id, metric_spool_path(spec, run_id))
            if progress_actor:
                self.progress = ray_actor(progress_actor)
        self.partition_schedule = PartitionSchedule(self.groups, self.regularizer, spec.modularity, spec.partitioner,
                                                    rank, self.engine.device, partitioners, self.logger)
        self.checkpoints = CheckpointManager(spec, rank, world_size, run_id, launch_session, checkpoint_key_id)
        restored = self.checkpoints.restore(self.engine, resume_from)
        self.start_step = restored.step if restored else 0
        if restored is not None:
            self.load_partition_state(restored.partition_state)
            if self.is_rank_zero:
                self.logger.log({metric_names.RESUMED_FROM_STEP: restored.step}, restored.step)
        self.batches = self.objective.batches(data.train, spec.training.micro_batch_size, rank, world_size,
                                              spec.training.seed, start_step=restored.data_position if restored else 0)
        self.evaluator = Evaluator(self.engine, self.objective, evaluation_sets(data, spec.evaluation),
                                   spec.evaluation, spec.training.micro_batch_size, rank, world_size,
                                   last_step=spec.training.steps - 1, device=self.engine.device)

    def run(self) -> None:
        training = self.spec.training
        for step in range(self.start_step, training.steps):
            self.maybe_partition(step)
            metrics = self.train_step(measure=self.metrics_due(step))
            memory = self.throughput.memory_metrics(step)  # every worker's peak, when due (a collective)
            metrics.update(memory)
            self.publish(step, metrics)
            self.maybe_evaluate(step)
            self.maybe_report(step, metrics)
        self.partition_schedule.finish()

    def metrics_due(self, step: int) -> bool:
        """Whether this rank reads the step's metrics back from the device (on a GPU, a synchronisation): at
        the steps rank 0 logs or posts progress, at every rank's Ray Train reports, and at memory steps (which
        rank 0 always logs)."""
        if self.report_due(step) or self.throughput.memory_due(step):
            return True
        if not self.is_rank_zero:
            return False
        return self.log_due(step) or (self.progress is not None and self.progress_due())

    def report_due(self, step: int) -> bool:
        """Every rank reports to Ray Train every ``training.report_every`` steps and when a checkpoint is due."""
        return self.checkpoints.due(step) or (step + 1) % self.spec.training.report_every == 0

    def log_due(self, step: int) -> bool:
        """Rank 0 logs every ``tracking.log_every_steps`` steps and at the last."""
        return step == self.spec.training.steps - 1 or step % self.spec.tracking.log_every_steps == 0

    def progress_due(self) -> bool:
        return time.monotonic() - self.last_progress_post >= PROGRESS_POST_INTERVAL_S

    def maybe_evaluate(self, step: int) -> None:
        """Eval loss, and perplexity or accuracy, every ``evaluation.every_steps``: all ranks run it, rank 0 logs."""
        if not self.evaluator.due(step):
            return
        self.regularizer.recording = False  # nobody reads C of the validation forwards (train_step turns it back)
        metrics = self.evaluator.evaluate()
        if self.is_rank_zero:
            self.logger.log(metrics, step)

    def maybe_partition(self, step: int) -> None:
        """Request or adopt a partition version at this step boundary, as the schedule decides (every rank)."""
        self.partition_schedule.maybe_repartition(step)

    def partition_state(self) -> dict | None:
        """The partition as checkpoints keep it (``PartitionSchedule.state_dict``: version, labels under
        ``"partitions"``, adoption steps); None before the first one. ``load_partition_state`` inverts it."""
        if self.partition_schedule.partitions is None:
            return None
        return self.partition_schedule.state_dict()

    def load_partition_state(self, state: dict | None) -> None:
        if state is not None:
            self.partition_schedule.load_state_dict(state)

    def train_step(self, measure: bool) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; its metrics when ``measure``
        (else ``{}``: nothing is read back from the device)."""
        started = time.perf_counter()
        lam = self.spec.modularity.lambda_
        lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on at its end)
        items = 0  # tokens or samples, as the objective counts them
        self.regularizer.recording = lam > 0 or measure
        for _ in range(self.spec.training.gradient_accumulation_steps):
            batch = next(self.batches)
            self.regularizer.clear()
            task_loss, task_metrics = self.objective.loss(self.engine, batch)
            partitioned = self.partition_schedule.partitions is not None
            loss = task_loss + self.regularizer.penalty(lam) if partitioned and lam > 0 else task_loss
            # taken before the optimizer step changes the weights (a no-op where the penalty already took them)
            values, masses = ((self.regularizer.values(), self.regularizer.masses()) if measure and partitioned
                              else ({}, {}))
            self.engine.backward(loss)
            self.engine.step()
            items += self.objective.count(batch)
        if measure:  # the read-back waits for the device, so the recorded time covers the whole step
            task, values, masses = to_floats(
                {metric_names.LOSS: loss, metric_names.TASK_LOSS: task_loss, **task_metrics}, values, masses)
        self.throughput.record(time.perf_counter() - started, items)
        if not measure:
            return {}
        metrics = {**task, metric_names.LEARNING_RATE: lr, **self.throughput.window_metrics(),
                   **loss_scaling_metrics(self.engine, self.spec.training.precision)}
        if values:
            metrics.update(self.clusterability_metrics(values, masses))
        return metrics

    def clusterability_metrics(self, values: dict[str, float], masses: dict[str, float]) -> dict[str, float]:
        """Per-matrix C, raw and normalised; their mean, mass-weighted mean and normalised mean."""
        from orchestrator.modularity import model_clusterability, normalized_clusterability

        summary = model_clusterability(list(values.values()), [masses[name] for name in values])
        baselines = self.partition_schedule.baselines
        normalised = {name: float(normalized_clusterability(c, baselines[name])) for name, c in values.items()}
        metrics = {metric_names.layer_clusterability(name): c for name, c in values.items()}
        metrics.update({metric_names.layer_clusterability_normalised(name): n for name, n in normalised.items()})
        metrics[metric_names.CLUSTERABILITY] = float(summary.mean)
        metrics[metric_names.CLUSTERABILITY_MASS_WEIGHTED] = float(summary.mass_weighted)
        metrics[metric_names.CLUSTERABILITY_NORMALISED] = sum(normalised.values()) / len(normalised)
        return metrics

    def publish(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0 only: queue the step's metrics for MLflow at the steps ``log_due`` names and at memory steps;
        post the progress snapshot a few times a second. ``metrics`` is empty at steps that were not measured."""
        if not self.is_rank_zero or not metrics:
            return
        if self.throughput.memory_due(step) or self.log_due(step):
            self.logger.log(metrics, step)
            self.throughput.restart_window()  # the next logged rates cover the steps from here on
        if self.progress is not None and (step == self.spec.training.steps - 1 or self.progress_due()):
            self.last_progress_post = time.monotonic()
            self.progress.post.remote({
                "step": step, "loss": metrics[metric_names.LOSS], "task_loss": metrics[metric_names.TASK_LOSS],
                "clusterability": metrics.get(metric_names.CLUSTERABILITY),
                "tokens_per_s": metrics.get(metric_names.TOKENS_PER_SECOND),
                "samples_per_s": metrics.get(metric_names.SAMPLES_PER_SECOND),
                "accuracy": metrics.get(metric_names.ACCURACY)})

    def maybe_report(self, step: int, metrics: dict[str, float]) -> None:
        """Report to Ray Train every ``report_every`` steps; the checkpoint manager reports instead when a
        checkpoint is due (every ``checkpointing.every_steps`` and at the end)."""
        import ray.train

        if not self.report_due(step):
            return
        reported = {"step": step, **{key: value for key, value in metrics.items() if "/" not in key}}
        if not self.checkpoints.due(step):
            ray.train.report(reported)
            return
        data_position = (step + 1) * self.spec.training.gradient_accumulation_steps
        self.checkpoints.save(self.engine, step, reported, self.partition_state(), data_position)

    def close(self) -> None:
        self.regularizer.remove()
        if self.logger is not None:
            self.logger.close()


def loss_scaling_metrics(engine, precision: str) -> dict[str, float]:
    """fp16: the dynamic loss scale and the optimizer steps skipped on overflow since the run began (DeepSpeed
    checkpoints both). A scale that keeps falling towards 1 means gradients that overflow at any scale: a
    diverging run, not one short of fp16's range. Nothing for fp32 and bf16, which never scale."""
    if precision != "fp16":
        return {}
    return {metric_names.LOSS_SCALE: float(engine.optimizer.cur_scale),
            metric_names.SKIPPED_STEPS: float(engine.skipped_steps)}


def to_floats(*groups: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """Every dict's scalar tensors as floats, in one device-to-host copy: on a GPU each ``.item()`` is a
    synchronisation that stops the host from queueing the next step's kernels."""
    flat = [tensor.detach() for group in groups for tensor in group.values()]  # 0-d; stack promotes dtypes
    floats = iter(torch.stack(flat).tolist() if flat else [])
    return [{name: next(floats) for name in group} for group in groups]


def ray_actor(name: str):
    import ray

    return ray.get_actor(name)

"""The per-rank training loop that every Ray Train worker runs.

Runbook: the driver (``orchestrator.train.launch``) starts N workers with the resolved spec; each builds the
same random model and its own shard of the data, wraps the model in a DeepSpeed engine at the spec's ZeRO
stage, and trains with ``task_loss - lambda * mean C``. Rank 0 computes the partition (after gathering
the matrices, a collective under ZeRO-3) and broadcasts it; rank 0 alone logs to MLflow and posts
progress. Every rank calls ``ray.train.report`` at the same steps: it is a barrier.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from orchestrator import metric_names
from orchestrator.spec import JobSpec


def train_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` carries the resolved spec, the MLflow run id and the progress actor name."""
    spec = JobSpec.model_validate(config["spec"])
    # Set before deepspeed is imported: it picks its accelerator once, at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.resources.use_gpu else "cpu")
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    session = TrainingSession(spec, rank, world_size, config["run_id"], config.get("progress_actor"))
    try:
        session.run()
    finally:
        session.close()


class TrainingSession:
    """One rank's engine, data stream, regulariser and (on rank 0) logger, stepped from ``run``."""

    def __init__(self, spec: JobSpec, rank: int, world_size: int, run_id: str, progress_actor: str | None):
        import deepspeed

        from orchestrator.data import batch_stream, build_synthetic_blocks
        from orchestrator.models import build_model
        from orchestrator.modularity import ClusterabilityRegularizer, find_matrix_groups
        from orchestrator.train.deepspeed_config import deepspeed_config

        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.is_rank_zero = rank == 0
        data = spec.data
        blocks, tokenizer = build_synthetic_blocks(data.num_examples, data.block_size, data.seed, data.tasks)
        self.batches = batch_stream(blocks, spec.training.micro_batch_size, rank, world_size, spec.training.seed)
        model = build_model(spec.model, tokenizer.vocab_size, seed=spec.training.seed)
        optimizer = None if spec.resources.use_gpu else torch.optim.AdamW(
            model.parameters(), lr=spec.training.lr, weight_decay=spec.training.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(spec, world_size))
        self.groups = find_matrix_groups(self.engine.module, spec.modularity.matrices)
        self.regularizer = ClusterabilityRegularizer()
        self.baselines: dict[str, float] = {}
        self.partitions = None
        self.logger = self.progress = None
        if self.is_rank_zero:
            from orchestrator.tracking import MetricLogger

            self.logger = MetricLogger(spec.tracking.uri, run_id)
            if progress_actor:
                self.progress = ray_actor(progress_actor)

    def run(self) -> None:
        training = self.spec.training
        metrics: dict[str, float] = {}
        for step in range(training.steps):
            self.maybe_partition(step)
            metrics = self.train_step()
            self.publish(step, metrics)
            self.maybe_report(step, metrics)

    def maybe_partition(self, step: int) -> None:
        """Compute the partition at ``partition_at_step`` (the method computes it once and keeps it)."""
        if step != self.spec.modularity.partition_at_step:
            return
        from orchestrator.modularity import baseline, regularize_groups
        from orchestrator.train.partitioning import compute_partitions

        started = time.perf_counter()
        self.partitions = compute_partitions(self.groups, self.spec.modularity, self.rank)
        regularize_groups(self.regularizer, self.groups, self.partitions)
        for group in self.groups:
            partition = self.partitions[group.name]
            for matrix, (row_labels, col_labels) in zip(group.matrices, partition.matrix_labels()):
                self.baselines[matrix.name] = float(baseline(row_labels, col_labels, partition.k))
        if self.is_rank_zero:
            self.logger.log({metric_names.PARTITION_SECONDS: time.perf_counter() - started}, step)
            self.save_partition_artifact(step)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        started = time.perf_counter()
        lam = self.spec.modularity.lambda_
        tokens = 0
        for _ in range(self.spec.training.gradient_accumulation_steps):
            batch = next(self.batches)
            input_ids = batch["input_ids"].to(self.engine.device)  # [B, T]
            labels = batch["labels"].to(self.engine.device)  # [B, T]
            self.regularizer.clear()
            task_loss = self.causal_lm_loss(input_ids, labels)
            loss = task_loss + self.regularizer.penalty(lam) if self.partitions and lam > 0 else task_loss
            self.engine.backward(loss)
            self.engine.step()
            tokens += input_ids.numel()
        elapsed = time.perf_counter() - started
        metrics = {metric_names.LOSS: loss.item(), metric_names.TASK_LOSS: task_loss.item(),
                   metric_names.STEP_TIME: elapsed,
                   metric_names.TOKENS_PER_SECOND: tokens * self.world_size / elapsed,
                   metric_names.LEARNING_RATE: self.engine.get_lr()[0]}
        metrics.update(self.clusterability_metrics())
        return metrics

    def causal_lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.engine(input_ids=input_ids).logits  # [B, T, vocab]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def clusterability_metrics(self) -> dict[str, float]:
        """Per-matrix C from the last forward, their mean, mass-weighted mean and normalised mean."""
        if not self.partitions:
            return {}
        from orchestrator.modularity import model_clusterability, normalized_clusterability

        values = {name: c.detach() for name, c in self.regularizer.values().items()}
        masses = self.regularizer.masses()
        summary = model_clusterability(list(values.values()), [masses[name] for name in values])
        metrics = {metric_names.layer_clusterability(name): c.item() for name, c in values.items()}
        metrics[metric_names.CLUSTERABILITY] = float(summary.mean)
        metrics[metric_names.CLUSTERABILITY_MASS_WEIGHTED] = float(summary.mass_weighted)
        metrics[metric_names.CLUSTERABILITY_NORMALISED] = sum(
            float(normalized_clusterability(c.item(), self.baselines[name])) for name, c in values.items()
        ) / len(values)
        return metrics

    def publish(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0 only: queue the step's metrics for MLflow and post the progress snapshot."""
        if not self.is_rank_zero:
            return
        self.logger.log(metrics, step)
        if self.progress is not None:
            self.progress.post.remote({
                "step": step, "loss": metrics[metric_names.LOSS], "task_loss": metrics[metric_names.TASK_LOSS],
                "clusterability": metrics.get(metric_names.CLUSTERABILITY),
                "tokens_per_s": metrics[metric_names.TOKENS_PER_SECOND]})

    def maybe_report(self, step: int, metrics: dict[str, float]) -> None:
        """Report to Ray Train every ``report_every`` steps, with a checkpoint when one is due and at the end."""
        import ray.train

        last = step == self.spec.training.steps - 1
        every = self.spec.checkpointing.every_steps
        checkpoint_due = last or (every > 0 and (step + 1) % every == 0)
        if not checkpoint_due and (step + 1) % self.spec.training.report_every:
            return
        reported = {"step": step, **{key: value for key, value in metrics.items() if "/" not in key}}
        if not checkpoint_due:
            ray.train.report(reported)
            return
        with tempfile.TemporaryDirectory() as directory:
            self.engine.save_checkpoint(directory, tag=f"step-{step + 1}")
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def save_partition_artifact(self, step: int) -> None:
        import pyarrow.parquet as pq

        from orchestrator.train.partitioning import partition_table

        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"partition-step{step}.parquet"
            pq.write_table(partition_table(self.groups, self.partitions), path)
            self.logger.log_artifact(str(path), "partitions")

    def close(self) -> None:
        self.regularizer.remove()
        if self.logger is not None:
            self.logger.close()


def ray_actor(name: str):
    import ray

    return ray.get_actor(name)

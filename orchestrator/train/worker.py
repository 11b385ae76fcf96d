"""The per-rank training loop that every Ray Train worker runs.

Runbook: the driver (``orchestrator.train.launch``) starts N workers with the resolved spec; each builds the
same random model and its own shard of the data, wraps the model in a DeepSpeed engine at the spec's ZeRO
stage, and trains with ``task_loss - lambda * mean C``. Side jobs (``orchestrator.side_jobs``) work beside
the loop on weights rank 0 gathers (a collective under ZeRO-3): the partitioner's actors compute the
partition, and every rank adopts each version at the same step (``orchestrator.partitioning.schedule``);
rank 0 alone logs to MLflow and posts progress. Every rank
calls ``ray.train.report`` at the same steps: it is a barrier. A session that starts from a checkpoint (a
restart after a failure, or ``xcm resume``) continues at its step, data position and partition
(``orchestrator.train.checkpointing``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from orchestrator import metric_names
from orchestrator.partitioning.side_job import PARTITIONING
from orchestrator.ranks import Rank
from orchestrator.side_jobs import step_boundary
from orchestrator.spec import JobSpec
from orchestrator.train.due import due

if TYPE_CHECKING:
    from orchestrator.gather import Gathered, Needs
    from orchestrator.side_jobs import SideJob

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
    rank = Rank(context.get_world_rank(), context.get_world_size())
    session = TrainingSession(
        spec,
        rank,
        config["run_id"],
        config.get("progress_actor"),
        config.get("resume_from"),
        config.get("side_job_actors", {}),
        config["session"],
        config.get("checkpoint_key_id"),
    )
    try:
        session.run()
    finally:
        session.close()


class TrainingSession:
    """One rank's engine, data stream, regulariser, side jobs and (on rank 0) logger, stepped from ``run``."""

    def __init__(
        self,
        spec: JobSpec,
        rank: Rank,
        run_id: str,
        progress_actor: str | None,
        resume_from: str | None = None,
        side_job_actors: Mapping[str, Sequence[str]] | None = None,
        launch_session: str = "",
        checkpoint_key_id: str | None = None,
    ):
        from orchestrator.data import build_training_data
        from orchestrator.data.training_data import evaluation_sets
        from orchestrator.models import build_model
        from orchestrator.modularity import ClusterabilityRegulariser, find_matrix_groups
        from orchestrator.train.checkpointing import CheckpointManager
        from orchestrator.train.engine import build_engine
        from orchestrator.train.evaluation import Evaluator
        from orchestrator.train.objectives import objective_for
        from orchestrator.train.throughput import throughput_meter

        job = spec  # as written: what a checkpoint keeps, so that a resume defines the global batch at max again
        spec = spec.on_workers(rank.world_size)  # an elastic group's accumulation for its size, before the engine
        self.spec, self.rank = spec, rank
        world_size = rank.world_size
        data = build_training_data(spec.data, spec.model)  # the driver built it first: a token-cache read here
        self.objective = objective_for(spec)  # next-token prediction, or classification (images, modular addition)
        model = build_model(spec.model, data.vocab_size, seed=spec.training.seed)
        flops = self.objective.model_flops(model, data.train)  # counted before ZeRO shards the weights
        self.checkpoints = CheckpointManager(job, rank, run_id, launch_session, checkpoint_key_id)
        resume_point = self.checkpoints.choose(resume_from)  # before the engine: it is built to load that form
        self.engine = build_engine(
            model, spec, world_size, load_universal=resume_point is not None and resume_point.state.universal
        )
        self.throughput = throughput_meter(spec, flops, world_size, self.objective.unit, self.engine.device)
        self.groups = find_matrix_groups(self.engine.module, spec.modularity.matrices)
        # lambda 0 (a control run) still reports C, computed without autograd at the steps that read it. Outside
        # ZeRO-3 the weights stay whole after each forward, so C is computed for all matrices at once, batched.
        self.regulariser = ClusterabilityRegulariser(
            differentiable=spec.modularity.lambda_ > 0, weights_persist=spec.deepspeed.zero_stage < 3
        )
        self.logger = self.progress = self.forwarded_warnings = None
        self.last_progress_post = float("-inf")
        if rank.leads:
            from orchestrator.tracking import MetricLogger
            from orchestrator.train.checkpoint_store import metric_spool_path

            self.logger = MetricLogger(
                spec.tracking.uri,
                run_id,
                metric_spool_path(spec, run_id),
                system_metrics_every_s=spec.tracking.system_metrics_every_s,
            )
            if progress_actor:
                from orchestrator.train.announcements import forward_warnings

                self.progress = ray_actor(progress_actor)
                self.forwarded_warnings = forward_warnings(self.progress)  # to the user's terminal
        self.side_jobs = self.build_side_jobs(dict(side_job_actors or {}))
        self.partition_schedule = self.side_jobs[PARTITIONING.name]  # its labels drive the loss and C's baselines
        restored = self.checkpoints.restore(self.engine, resume_point, list(self.side_jobs), self.logger)
        self.start_step = restored.step if restored else 0
        if restored is not None:
            for name, state in restored.side_job_states.items():
                self.side_jobs[name].load_state_dict(state)
            if rank.leads:
                self.logger.log({metric_names.RESUMED_FROM_STEP: restored.step}, restored.step)
        if spec.resources.elastic and rank.leads:
            self.log_group_size(restored)
        self.batches = self.objective.batches(
            data.train,
            spec.training.micro_batch_size,
            rank.index,
            world_size,
            spec.training.seed,
            start_step=restored.data_position if restored else 0,
            global_batch=spec.training.micro_batch_size * spec.training.gradient_accumulation_steps * world_size,
        )
        self.evaluator = Evaluator(
            self.engine,
            self.objective,
            evaluation_sets(data, spec.evaluation.per_task),
            spec.evaluation,
            spec.training.micro_batch_size,
            rank.index,
            world_size,
            last_step=spec.training.steps - 1,
            device=self.engine.device,
        )

    def log_group_size(self, restored) -> None:
        """Rank 0 of an elastic group: its worker count at its first step, and the count it resized from when it
        continues another's checkpoint; through the spool (a step is logged once) and, as a line, to the user."""
        metrics = {metric_names.WORKERS: self.rank.world_size}
        if restored is not None and restored.world_size != self.rank.world_size:
            metrics[metric_names.RESIZED_FROM] = restored.world_size
        self.side_job_logger().log(metrics, self.start_step)

    def build_side_jobs(self, actor_names: dict[str, Sequence[str]]) -> dict[str, SideJob]:
        """Every side job the spec enables, by name, with the actors the driver started for it."""
        from orchestrator.side_jobs import SideJobContext
        from orchestrator.train.side_job_registry import enabled_side_jobs

        def context(kind) -> SideJobContext:
            return SideJobContext(
                rank=self.rank,
                device=self.engine.device,
                groups=self.groups,
                regulariser=self.regulariser,
                actor_names=list(actor_names.get(kind.name, ())),
                logger=self.side_job_logger(),
                partitions=lambda: self.partition_schedule.partitions,
                engine=self.engine,
            )

        return {kind.name: kind.build(self.spec, context(kind)) for kind in enabled_side_jobs(self.spec)}

    def side_job_logger(self):
        """Rank 0's logger, through which a partition version or circuit results also reach the user's
        terminal as a line (the progress board's notes); None on the other ranks."""
        from orchestrator.train.announcements import AnnouncingLogger

        return self.logger if self.progress is None else AnnouncingLogger(self.logger, self.progress)

    def gather(self, needs: Needs) -> Gathered | None:
        """What a side job needs of the weights, on rank 0 (a collective under ZeRO-3: every rank calls it)."""
        from orchestrator.gather import gather

        return gather(needs, self.engine.module, self.groups, self.rank)

    def run(self) -> None:
        for step in range(self.start_step, self.spec.training.steps):
            self.run_step(step)
        for job in self.side_jobs.values():
            job.finish(self.gather(job.needs()))

    def run_step(self, step: int) -> None:
        """Everything every rank does for step index `step`: the side jobs' boundary, the step, and what is due
        after it (``bench/step_ab.py`` times this alone)."""
        for job in self.side_jobs.values():  # every rank, before the step: they may enter collectives
            step_boundary(job, step, self.gather)
        metrics = self.train_step(measure=self.metrics_due(step))
        memory = self.throughput.memory_metrics(step)  # every worker's peak, when due (a collective)
        metrics.update(memory)
        self.publish(step, metrics)
        self.maybe_evaluate(step)
        self.maybe_report(step, metrics)

    def metrics_due(self, step: int) -> bool:
        """Whether this rank reads the step's metrics back from the device (on a GPU, a synchronisation): at
        the steps rank 0 logs or posts progress, at every rank's Ray Train reports, and at memory steps (which
        rank 0 always logs)."""
        if self.report_due(step) or self.throughput.memory_due(step):
            return True
        if not self.rank.leads:
            return False
        return self.log_due(step) or (self.progress is not None and self.progress_due())

    def report_due(self, step: int) -> bool:
        """Every rank reports to Ray Train every ``training.report_every`` steps and when a checkpoint is due."""
        return self.checkpoints.due(step) or due(step, self.spec.training.report_every, self.last_step)

    def log_due(self, step: int) -> bool:
        """Rank 0 logs the first step, every ``tracking.log_every_steps`` steps and the last."""
        return due(step, self.spec.tracking.log_every_steps, self.last_step, first=True)

    @property
    def last_step(self) -> int:
        return self.spec.training.steps - 1

    def progress_due(self) -> bool:
        return time.monotonic() - self.last_progress_post >= PROGRESS_POST_INTERVAL_S

    def maybe_evaluate(self, step: int) -> None:
        """Eval loss, and perplexity or accuracy, every ``evaluation.every_steps``: all ranks run it, rank 0 logs."""
        if not self.evaluator.due(step):
            return
        self.regulariser.recording = False  # nobody reads C of the validation forwards (train_step turns it back)
        metrics = self.evaluator.evaluate()
        if self.rank.leads:
            self.logger.log(metrics, step)

    def train_step(self, measure: bool) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; its metrics when ``measure``
        (else ``{}``: nothing is read back from the device)."""
        started = time.perf_counter()
        lam = self.spec.modularity.lambda_
        lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on at its end)
        items = 0  # tokens or samples, as the objective counts them
        self.regulariser.recording = lam > 0 or measure
        for _ in range(self.spec.training.gradient_accumulation_steps):
            batch = next(self.batches)
            self.regulariser.clear()
            task_loss, task_metrics = self.objective.loss(self.engine, batch)
            partitioned = self.partition_schedule.partitions is not None
            loss = task_loss + self.regulariser.penalty(lam) if partitioned and lam > 0 else task_loss
            # taken before the optimizer step changes the weights (a no-op where the penalty already took them)
            values, masses = (
                (self.regulariser.values(), self.regulariser.masses()) if measure and partitioned else ({}, {})
            )
            self.engine.backward(loss)
            self.engine.step()
            items += self.objective.count(batch)
        if measure:  # the read-back waits for the device, so the recorded time covers the whole step
            task, values, masses = to_floats(
                {metric_names.LOSS: loss, metric_names.TASK_LOSS: task_loss, **task_metrics}, values, masses
            )
        self.throughput.record(time.perf_counter() - started, items)
        if not measure:
            return {}
        metrics = {
            **task,
            metric_names.LEARNING_RATE: lr,
            **self.throughput.window_metrics(),
            **loss_scaling_metrics(self.engine, self.spec.training.precision),
        }
        if values:
            metrics.update(self.clusterability_metrics(values, masses))
        return metrics

    def clusterability_metrics(self, values: dict[str, float], masses: dict[str, float]) -> dict[str, float]:
        """Per-matrix C, raw and normalised; their mean, mass-weighted mean and normalised mean."""
        from orchestrator.modularity import model_clusterability, normalised_clusterability

        summary = model_clusterability(list(values.values()), [masses[name] for name in values])
        baselines = self.partition_schedule.baselines
        normalised = {name: float(normalised_clusterability(c, baselines[name])) for name, c in values.items()}
        metrics = {metric_names.layer_clusterability(name): c for name, c in values.items()}
        metrics.update({metric_names.layer_clusterability_normalised(name): n for name, n in normalised.items()})
        metrics[metric_names.CLUSTERABILITY] = float(summary.mean)
        metrics[metric_names.CLUSTERABILITY_MASS_WEIGHTED] = float(summary.mass_weighted)
        metrics[metric_names.CLUSTERABILITY_NORMALISED] = sum(normalised.values()) / len(normalised)
        return metrics

    def publish(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0 only: queue the step's metrics for MLflow at the steps ``log_due`` names and at memory steps;
        post the progress snapshot a few times a second. ``metrics`` is empty at steps that were not measured."""
        if not self.rank.leads or not metrics:
            return
        if self.throughput.memory_due(step) or self.log_due(step):
            self.logger.log(metrics, step)
            self.throughput.restart_window()  # the next logged rates cover the steps from here on
        if self.progress is not None and (step == self.last_step or self.progress_due()):
            self.last_progress_post = time.monotonic()
            self.progress.post.remote(
                {
                    "step": step,
                    "loss": metrics[metric_names.LOSS],
                    "task_loss": metrics[metric_names.TASK_LOSS],
                    "clusterability": metrics.get(metric_names.CLUSTERABILITY),
                    "tokens_per_s": metrics.get(metric_names.TOKENS_PER_SECOND),
                    "samples_per_s": metrics.get(metric_names.SAMPLES_PER_SECOND),
                    "accuracy": metrics.get(metric_names.ACCURACY),
                }
            )

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
        states = {name: job.state_dict() for name, job in self.side_jobs.items()}
        self.checkpoints.save(self.engine, step, reported, states, data_position)

    def close(self) -> None:
        from orchestrator.train.announcements import stop_forwarding

        self.regulariser.remove()
        if self.forwarded_warnings is not None:
            stop_forwarding(self.forwarded_warnings)
        if self.logger is not None:
            self.logger.close()


def loss_scaling_metrics(engine, precision: str) -> dict[str, float]:
    """fp16: the dynamic loss scale and the optimizer steps skipped on overflow since the run began (DeepSpeed
    checkpoints both). A scale that keeps falling towards 1 means gradients that overflow at any scale: a
    diverging run, not one short of fp16's range. Nothing for fp32 and bf16, which never scale."""
    if precision != "fp16":
        return {}
    return {
        metric_names.LOSS_SCALE: float(engine.optimizer.cur_scale),
        metric_names.SKIPPED_STEPS: float(engine.skipped_steps),
    }


def to_floats(*groups: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """Every dict's scalar tensors as floats, in one device-to-host copy: on a GPU each ``.item()`` is a
    synchronisation that stops the host from queueing the next step's kernels."""
    flat = [tensor.detach() for group in groups for tensor in group.values()]  # 0-d; stack promotes dtypes
    floats = iter(torch.stack(flat).tolist() if flat else [])
    return [{name: next(floats) for name in group} for group in groups]


def ray_actor(name: str):
    import ray

    return ray.get_actor(name)

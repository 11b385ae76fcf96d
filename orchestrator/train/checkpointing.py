"""Each rank's side of checkpoints: save everything a run needs to continue exactly, and restore it.

Saving goes through Ray Train's mechanism: every rank writes its part into a local directory (DeepSpeed's
``save_checkpoint`` is a collective), the ranks agree on the manifest, and every rank calls
``ray.train.report(..., checkpoint=...)``; Ray merges the directories into the run's storage and keeps the
last ``keep_last``. Restoring takes Ray's latest checkpoint (after a worker-group restart, or a rerun of the
same run) or, when newer, the one the driver passes (``xcm resume``); rank 0 verifies it, falls back to an
older intact one when needed, and broadcasts the choice, so every rank loads the same checkpoint. The layout
and the verification live in ``checkpoint_store``.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from orchestrator.spec import JobSpec
from orchestrator.train import checkpoint_store as store

logger = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """A checkpoint that this run's shape cannot load (raised on every rank, before any state is touched)."""


@dataclass(frozen=True)
class Restored:
    """What the loop needs from a restored checkpoint, besides the engine state loaded in place."""

    step: int  # the step index to continue at
    data_position: int  # micro-batches already consumed by each rank
    partition_state: Any  # whatever ``TrainingSession.partition_state`` returned at save time


class CheckpointManager:
    """Saves (``due``/``save``) and restores (``restore``) one rank's full training state."""

    def __init__(self, spec: JobSpec, rank: int, world_size: int, run_id: str):
        self.spec, self.rank, self.world_size, self.run_id = spec, rank, world_size, run_id

    def due(self, step: int) -> bool:
        """A checkpoint after step index ``step``: every ``every_steps`` steps and after the last one."""
        every = self.spec.checkpointing.every_steps
        return step == self.spec.training.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def save(self, engine, step: int, metrics: dict, partition_state: Any, data_position: int) -> None:
        """Every rank: write this rank's part, agree on the manifest, report the checkpoint to Ray Train."""
        import ray.train
        import transformers

        completed = step + 1
        tag = f"step-{completed}"
        directory = Path(tempfile.mkdtemp(prefix="xcm-checkpoint-"))
        try:
            engine.save_checkpoint(str(directory / store.DEEPSPEED), tag=tag)
            _save(capture_rng_state(), directory / store.rng_file(self.rank))
            if self.rank == 0:
                state = store.CheckpointState(
                    step=completed, data_position=data_position, world_size=self.world_size,
                    zero_stage=self.spec.deepspeed.zero_stage, run_id=self.run_id, deepspeed_tag=tag)
                (directory / store.STATE).write_text(state.to_json())
                (directory / store.JOB).write_text(yaml.safe_dump(
                    self.spec.model_dump(mode="json", by_alias=True), sort_keys=False))
                _save(partition_state, directory / store.PARTITION)
                if isinstance(engine.module, transformers.PreTrainedModel):  # xcm's own models have no HF config
                    engine.module.config.to_json_file(directory / store.MODEL_CONFIG)
            records = _all_ranks(store.file_records(directory))
            if self.rank == 0:
                store.write_manifest(directory, {name: record for rank_records in records
                                                 for name, record in rank_records.items()})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=store.checkpoint_name(completed))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def restore(self, engine, resume_from: str | None) -> Restored | None:
        """Every rank: load the newest intact checkpoint of this run into ``engine``; None for a fresh start."""
        import ray.train

        located = None
        if self.rank == 0:
            checkpoint = ray.train.get_checkpoint()
            # Ray Train lists a checkpoint only after the workers have moved past it, so a run that died just after
            # an upload left a newer intact checkpoint than Ray's latest; `xcm resume` passes that one (names sort
            # by step). A restart later in the resumed run has a newer checkpoint of Ray's own.
            if resume_from and (checkpoint is None or Path(resume_from).name > Path(checkpoint.path).name):
                located = store.newest_intact(*store.resolve(resume_from))
            elif checkpoint is not None:
                located = store.newest_intact(checkpoint.filesystem, checkpoint.path)
            if (checkpoint is not None or resume_from) and located is None:
                logger.warning("no intact checkpoint to resume from (see the warnings above): starting at step 0")
        located = _from_rank_zero(located)
        if located is None:
            return None
        check_resumable(located.state, self.world_size, located.uri)
        checkpoint = ray.train.Checkpoint(located.path, filesystem=located.filesystem)
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            load_path, _ = engine.load_checkpoint(str(directory / store.DEEPSPEED), tag=located.state.deepspeed_tag)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {directory / store.DEEPSPEED}")
            restore_rng_state(_load(directory / store.rng_file(self.rank)))
            partition_state = _load(directory / store.PARTITION)
        if self.rank == 0:
            logger.info("resumed from %s at step %d", located.uri, located.state.step)
        return Restored(located.state.step, located.state.data_position, partition_state)


def check_resumable(state: store.CheckpointState, world_size: int, where: str) -> None:
    """Stop with the way out when the checkpoint's ZeRO shards cannot be loaded by ``world_size`` ranks."""
    if state.world_size == world_size:
        return
    raise ResumeMismatch(
        f"checkpoint {where} was written by {state.world_size} workers and this run has {world_size}; its "
        f"ZeRO-{state.zero_stage} shards are split {state.world_size} ways. Resume with "
        f"--set resources.num_workers={state.world_size}, or start a new run from its consolidated weights: "
        f"`xcm export {where} --to hf DIR`, then model.init: pretrained with model.pretrained: DIR.")


def capture_rng_state() -> dict:
    """Python, numpy and torch (and CUDA, when present) random states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(value: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)


def _load(path: Path) -> Any:
    # xcm's own files (RNG tuples, numpy label arrays): not plain tensors, so not loadable weights-only.
    return torch.load(path, weights_only=False)


def _all_ranks(value: Any) -> list:
    """``value`` from every rank, in rank order (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]

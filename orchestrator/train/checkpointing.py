"""Each rank's side of checkpoints: save everything a run needs to continue exactly, and restore it.

Saving goes through Ray Train's mechanism: every rank writes its part into a local directory (DeepSpeed's
``save_checkpoint`` is a collective), the ranks agree on the manifest, and every rank calls
``ray.train.report(..., checkpoint=...)``; Ray merges the directories into the run's storage and keeps the
last ``keep_last``. Restoring takes the checkpoint the driver passes (``xcm resume``: exactly that one), or
Ray's latest when this launch wrote it (a worker-group restart) or when the driver passes none; rank 0
verifies it, falls back from Ray's latest to an older intact one when needed, and broadcasts the choice, so
every rank loads the same checkpoint. The choice comes before the engine is built (``choose``), whose DeepSpeed
config says whether it loads a universal checkpoint. Every rank then verifies the local directory it reads (Ray
downloads a remote one) before DeepSpeed unpickles its shards. xcm's own files are JSON. The layout and the
verification live in ``checkpoint_store``.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.ranks import Rank
from orchestrator.spec import JobSpec
from orchestrator.train import checkpoint_store as store
from orchestrator.train.due import due

logger = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """A checkpoint that this run's shape cannot load (raised on every rank, before any state is touched)."""


class CheckpointRefused(RuntimeError):
    """The checkpoint to resume from does not verify (raised on every rank, before any of it is opened)."""


@dataclass(frozen=True)
class Restored:
    """What the loop needs from a restored checkpoint, besides the engine state loaded in place."""

    step: int  # the step index to continue at
    data_position: int  # micro-batches already consumed by each rank
    side_job_states: dict[str, Any]  # side job name -> its ``state_dict()`` at save time (absent: none kept)
    world_size: int  # the worker count that wrote the checkpoint (an elastic group's may differ from its own)


class CheckpointManager:
    """Saves (``due``/``save``) and restores (``choose``, then ``restore``) one rank's full training state.

    ``session`` names this launch (``xcm run`` or ``xcm resume``): it is written into every checkpoint, so a
    restart tells this launch's checkpoints from those of the run's earlier launches. ``key_id`` is the
    driver's checkpoint key (``checkpoint_store.key_id``): a worker whose key differs (a cluster node without
    the key secret) stops at once instead of writing checkpoints no other node can verify.
    """

    def __init__(self, spec: JobSpec, rank: Rank, run_id: str, session: str, key_id: str | None = None):
        self.spec, self.rank, self.run_id = spec, rank, run_id
        self.session = session or uuid.uuid4().hex  # a caller without one is a launch of its own
        if key_id is not None and store.key_id(store.checkpoint_key()) != key_id:
            raise store.CheckpointKeyError(
                f"this worker's checkpoint key differs from the driver's: set {store.KEY_ENV} to the same key on "
                "every node (on a cluster, the Kubernetes secret every Ray pod gets)"
            )

    def due(self, step: int) -> bool:
        """A checkpoint after step index ``step``: every ``every_steps`` steps and after the last one."""
        return due(step, self.spec.checkpointing.every_steps, last_step=self.spec.training.steps - 1)

    def save(self, engine, step: int, metrics: dict, side_job_states: dict[str, Any], data_position: int) -> None:
        """Every rank: write this rank's part, agree on the manifest, report the checkpoint to Ray Train.
        ``side_job_states`` (name -> JSON values) are rank 0's, one JSON file each."""
        import ray.train
        import transformers

        completed = step + 1
        tag = f"step-{completed}"
        checkpoint_dir_name = self._save_name(completed)
        directory = Path(tempfile.mkdtemp(prefix="xcm-checkpoint-"))
        try:
            engine.save_checkpoint(str(directory / store.DEEPSPEED), tag=tag)
            _write_json(capture_rng_state(), directory / store.rng_file(self.rank.index))
            if self.rank.leads:
                state = store.CheckpointState(
                    step=completed,
                    data_position=data_position,
                    world_size=self.rank.world_size,
                    zero_stage=self.spec.deepspeed.zero_stage,
                    run_id=self.run_id,
                    deepspeed_tag=tag,
                    session=self.session,
                )
                (directory / store.STATE).write_text(state.to_json())
                (directory / store.JOB).write_text(self.spec.to_yaml())
                for name, side_job_state in side_job_states.items():
                    _write_json(side_job_state, directory / store.side_job_file(name))
                if isinstance(engine.module, transformers.PreTrainedModel):  # xcm's own models have no HF config
                    engine.module.config.to_json_file(directory / store.MODEL_CONFIG)
                self._keep_unsent_metrics(directory / store.UNSENT_METRICS)
            records = _all_ranks(store.file_records(directory))
            if self.rank.leads:
                store.write_manifest(
                    directory, {name: record for rank_records in records for name, record in rank_records.items()}
                )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                checkpoint_dir_name=checkpoint_dir_name,
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _save_name(self, completed: int) -> str:
        """Every rank: rank 0's ``checkpoint_store.save_name`` in Ray Train's storage of the run (a collective, before
        any rank uploads); its failure is raised on every rank, or the others would wait for the name forever."""
        import ray.train

        name, failure = None, None
        if self.rank.leads:
            storage = ray.train.get_context().get_storage()
            try:
                name = store.save_name(storage.storage_filesystem, storage.experiment_fs_path, completed)
            except OSError as error:
                failure = f"cannot name checkpoint {completed} in {storage.experiment_fs_path}: {error}"
        name, failure = _from_rank_zero((name, failure))
        if failure is not None:
            raise OSError(failure)
        return name

    def _keep_unsent_metrics(self, destination: Path) -> None:
        """Rank 0: the metric spool's unsent lines into the checkpoint, for a resume on a node without this spool
        (the metrics of the steps up to the checkpoint are never recomputed). A failure costs nothing but them."""
        from orchestrator.metric_spool import MetricSpool

        try:
            spool = MetricSpool(store.metric_spool_path(self.spec, self.run_id), writer=False)
            try:
                spool.copy_unsent(destination)
            finally:
                spool.close()
        except OSError as error:
            destination.unlink(missing_ok=True)
            logger.warning("the checkpoint keeps no unsent metrics (%s); they stay in the local spool", error)

    def choose(self, resume_from: str | None) -> store.Located | None:
        """Every rank: the checkpoint to continue from, None for a fresh start (a collective).

        Made before the engine is built: whether DeepSpeed loads the universal form is part of the config it
        is built with (``checkpoint.load_universal``). Rank 0 verifies the checkpoint and, in an elastic group of
        another size, converts it, while the other ranks wait for its choice; a refusal is raised on every rank.
        """
        choice = None
        if self.rank.leads:
            try:
                choice = self._choose(resume_from)
            except store.CheckpointKeyError as error:  # every rank must hear of it, or the others wait forever
                choice = str(error)
            choice = self._at_this_size(choice)
        choice = _from_rank_zero(choice)
        if isinstance(choice, str):
            raise CheckpointRefused(choice)
        if choice is not None:
            check_resumable(choice.state, self.rank.world_size, choice.uri)
        return choice

    def restore(
        self, engine, located: store.Located | None, side_jobs: Sequence[str], metrics_logger=None
    ) -> Restored | None:
        """Every rank: load ``located`` (``choose``'s checkpoint) into ``engine``, with the states it kept of the
        side jobs named; None for a fresh start. Rank 0 hands ``metrics_logger`` (its ``MetricLogger``) the
        metrics the checkpoint kept unsent."""
        import ray.train

        if located is None:
            return None
        checkpoint = ray.train.Checkpoint(located.path, filesystem=located.filesystem)
        with checkpoint.as_directory() as local:
            directory = Path(local)
            _verify_on_every_rank(directory, located)
            _load_engine(engine, directory / store.DEEPSPEED, located.state)
            rng = directory / store.rng_file(self.rank.index)
            if rng.is_file():  # a rank the checkpoint's smaller worker group did not have keeps its seeded state
                restore_rng_state(_read_json(rng))
            side_job_states = {
                name: _read_json(directory / store.side_job_file(name))
                for name in side_jobs
                if (directory / store.side_job_file(name)).is_file()
            }
            if metrics_logger is not None:
                unsent = directory / store.UNSENT_METRICS
                metrics_logger.continue_run(unsent if unsent.is_file() else None)
        if self.rank.leads:
            logger.info("resumed from %s at step %d", located.uri, located.state.step)
        return Restored(
            located.state.step,
            data_position(located.state, self.rank.world_size),
            side_job_states,
            located.state.world_size,
        )

    def _at_this_size(self, choice: store.Located | str | None) -> store.Located | str | None:
        """Rank 0, in an elastic group: a checkpoint written by another worker count as its universal form
        (converted once and kept beside it, as ``xcm resume`` does), while the other ranks wait in the broadcast
        of the choice; why not, as the refusal every rank raises, when the conversion fails."""
        if not (
            self.spec.resources.elastic
            and isinstance(choice, store.Located)
            and choice.state.world_size != self.rank.world_size
            and not choice.state.universal
        ):
            return choice
        from orchestrator.train.universal import universal_checkpoint

        logger.info(
            "the checkpoint of step %d was written by %d workers and this group has %d: loading its universal form",
            choice.state.step,
            choice.state.world_size,
            self.rank.world_size,
        )
        try:
            return universal_checkpoint(choice)
        except Exception as error:  # any failure: every rank must hear of it, or the others wait forever
            return f"checkpoint {choice.uri} could not be converted for {self.rank.world_size} workers: {error}"

    def _choose(self, resume_from: str | None) -> store.Located | str | None:
        """Rank 0: the verified checkpoint to continue from, None for a fresh start, or why it must not start.

        Ray's latest checkpoint, when this launch wrote it, is a restart within this launch; Ray also restores
        the list of a run's earlier launches, whose latest may be newer than the checkpoint ``xcm resume``
        names (a rollback past a divergence): that one is resumed from exactly, or refused.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        rays = None if checkpoint is None else store.newest_intact(checkpoint.filesystem, checkpoint.path)
        if rays is not None and (resume_from is None or rays.state.session == self.session):
            return rays
        if resume_from:
            try:
                return store.verified(*store.resolve(resume_from))
            except store.NotIntact as error:
                return f"the checkpoint to resume from does not verify, so nothing of it is loaded: {error}"
        if checkpoint is not None:
            logger.warning("no intact checkpoint to resume from (see the warnings above): starting at step 0")
        return None


def _verify_on_every_rank(directory: Path, located: store.Located) -> None:
    """Each rank verifies the local directory it is about to read (a collective): any rank's failure stops
    every rank, before DeepSpeed unpickles a shard."""
    try:
        store.verify_local(directory, located.state)
        reason = None
    except store.NotIntact as error:
        reason = str(error)
    reasons = [reason for reason in _all_ranks(reason) if reason is not None]
    if reasons:
        raise CheckpointRefused(
            f"checkpoint {located.uri} as read on this node does not verify, so nothing of it is loaded: {reasons[0]}"
        )


def _load_engine(engine, deepspeed_directory: Path, state: store.CheckpointState) -> None:
    """DeepSpeed's ``load_checkpoint``, by an engine built to read the checkpoint's form: DeepSpeed takes the
    universal form only when its config says ``checkpoint.load_universal`` (``engine.build_engine``), and
    either form read as the other fails deep inside it or loads the wrong shards."""
    if engine.load_universal_checkpoint() != state.universal:
        raise RuntimeError(
            f"the engine was built with checkpoint.load_universal={engine.load_universal_checkpoint()} for "
            f"{deepspeed_directory.parent}, whose state says universal={state.universal}"
        )
    load_path, _ = engine.load_checkpoint(str(deepspeed_directory), tag=state.deepspeed_tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {deepspeed_directory}")


def data_position(state: store.CheckpointState, world_size: int) -> int:
    """The micro-batches each of ``world_size`` ranks has consumed at the checkpoint. Each epoch's order is dealt
    to the ranks in turn, so what the run has read of an epoch is its order's first ``data_position x world_size``
    micro-batches whatever the worker count, and a resized run, whose global batch is the same (its gradient
    accumulation makes up for the worker count, see ``resume.keep_global_batch``), continues after them, also past
    the first epoch: an epoch is whole global batches whatever the worker count (``loader.epoch_length``)."""
    return state.data_position * state.world_size // world_size


def check_resumable(state: store.CheckpointState, world_size: int, where: str) -> None:
    """Stop with the way out when the checkpoint's ZeRO shards cannot be loaded by ``world_size`` ranks (a
    universal checkpoint loads at any worker count)."""
    if state.world_size == world_size or state.universal:
        return
    raise ResumeMismatch(
        f"checkpoint {where} was written by {state.world_size} workers and this run has {world_size}; its "
        f"ZeRO-{state.zero_stage} shards are split {state.world_size} ways. Resume it with `xcm resume`, which "
        f"converts it for another worker count (ZeRO 1-3), or with --set resources.num_workers={state.world_size}."
    )


def capture_rng_state() -> dict:
    """Python, numpy and torch (and CUDA, when present) random states of this process, as JSON values."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _bytes_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_text(device_state) for device_state in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    np.random.set_state(
        (
            numpy_state["name"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(text) for text in state["cuda"]])


def _bytes_text(tensor: torch.Tensor) -> str:
    """A uint8 RNG state tensor as base64 text."""
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _write_json(value: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


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

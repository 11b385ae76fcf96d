"""What makes a directory a complete xcm checkpoint, and which checkpoint of a run to resume from.

One checkpoint, as Ray Train stores it under the run directory ``<storage_path>/<job name>-<run id[:8]>/``
(Ray merges every rank's files into it):

    step-00000010/
      deepspeed/latest, deepspeed/step-10/...   DeepSpeed engine state: module, every rank's optimizer shard,
                                                LR schedule (when the engine has one)
      xcm/state.json        step, data position, world size, ZeRO stage, MLflow run id, DeepSpeed tag
      xcm/job.yaml          the resolved job spec, itself a loadable job file
      xcm/config.json       the model's transformers config (what ``xcm export`` rebuilds the model from)
      xcm/partition.pt      the partition state
      xcm/rng-rank-<r>.pt   python, numpy and torch RNG states of rank r
      manifest.json         every file above with its size and sha256

Ranks upload to storage independently and in no fixed order, so "written last" cannot be an upload order:
a checkpoint counts only when its manifest is there and every file it lists is present with the listed size
and hash. A crash mid-upload, a truncated or corrupted file, a missing manifest: the checkpoint is skipped for
the previous one, with a warning. Storage is any pyarrow filesystem (a local path, ``s3://``...), as in Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "xcm/state.json"
JOB = "xcm/job.yaml"
MODEL_CONFIG = "xcm/config.json"
PARTITION = "xcm/partition.pt"
DEEPSPEED = "deepspeed"
CHECKPOINT_PREFIX = "step-"
METRIC_SPOOL = "mlflow-spool.jsonl"
_CHUNK = 1 << 22


def rng_file(rank: int) -> str:
    return f"xcm/rng-rank-{rank}.pt"


def checkpoint_name(step: int) -> str:
    """Zero-padded, so that name order is step order (the newest checkpoint sorts last)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def run_directory_name(job_name: str, run_id: str) -> str:
    """Ray Train's run name for an MLflow run: the same on every start, so a resumed run finds its checkpoints."""
    return f"{job_name}-{run_id[:8]}"


def run_directory(spec: JobSpec, run_id: str) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<checkpointing.storage_path>/<job name>-<run id[:8]>``."""
    return f"{spec.checkpointing.storage_path.rstrip('/')}/{run_directory_name(spec.name, run_id)}"


def metric_spool_path(spec: JobSpec, run_id: str) -> Path:
    """Rank 0's metric spool: in the run directory on local storage, so ``xcm resume`` finds what a dead run
    left unsent; in the local temporary directory when the storage is remote (a spool is appended to)."""
    directory = run_directory(spec, run_id)
    if "://" in directory:
        return Path(tempfile.gettempdir()) / "xcm-spool" / run_directory_name(spec.name, run_id) / METRIC_SPOOL
    return Path(directory) / METRIC_SPOOL


@dataclass(frozen=True)
class CheckpointState:
    """The scalars a resumed run needs besides the engine: where it stopped and what wrote it."""

    step: int  # optimizer steps completed; training continues at this step index
    data_position: int  # micro-batches each rank has consumed (the batch stream's start_step)
    world_size: int
    zero_stage: int
    run_id: str  # the MLflow run the metrics go to
    deepspeed_tag: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CheckpointState:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Located:
    """A verified checkpoint: where it is and its state."""

    filesystem: pafs.FileSystem
    path: str
    state: CheckpointState

    @property
    def uri(self) -> str:
        """A string that ``resolve`` and Ray's ``Checkpoint`` both read back to this place."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return self.path
        return f"{self.filesystem.type_name}://{self.path}"


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path (absolute or relative) or any URI pyarrow reads, as (filesystem, path)."""
    if "://" not in location:
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    return pafs.FileSystem.from_uri(location)


def file_records(directory: Path) -> dict[str, dict]:
    """Every file under a local directory as ``relative path -> {size, sha256}``."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
        records[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return records


def write_manifest(directory: Path, records: dict[str, dict]) -> None:
    """Write the manifest of a checkpoint whose files (of every rank) are ``records``."""
    listed = {name: record for name, record in records.items() if name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": listed}, indent=1, sort_keys=True))


def problem(filesystem: pafs.FileSystem, path: str) -> str | None:
    """Why the checkpoint at ``path`` is not complete and intact, or None when it is."""
    try:
        manifest = json.loads(_read(filesystem, f"{path}/{MANIFEST}"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save or upload did not finish)"
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    for name, record in files.items():
        info = filesystem.get_file_info(f"{path}/{name}")
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != record["size"]:
            return f"{name} has {info.size} bytes, the manifest says {record['size']}"
        if _sha256(filesystem, f"{path}/{name}") != record["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    if STATE not in files:
        return f"the manifest lists no {STATE}"
    return None


def read_state(filesystem: pafs.FileSystem, path: str) -> CheckpointState:
    return CheckpointState.from_json(_read(filesystem, f"{path}/{STATE}"))


def read_text(located: Located, name: str) -> str:
    return _read(located.filesystem, f"{located.path}/{name}")


def newest_intact(filesystem: pafs.FileSystem, candidate: str) -> Located | None:
    """The newest intact checkpoint at or before ``candidate`` (a checkpoint or a run directory).

    Each checkpoint skipped on the way is logged with its problem.
    """
    for path in _candidates(filesystem, candidate):
        reason = problem(filesystem, path)
        if reason is None:
            return Located(filesystem, path, read_state(filesystem, path))
        logger.warning("skipping checkpoint %s: %s; trying the previous one", path, reason)
    return None


def _candidates(filesystem: pafs.FileSystem, candidate: str) -> list[str]:
    """``candidate`` and the older checkpoints beside it, newest first; a run directory's checkpoints, newest first."""
    candidate = candidate.rstrip("/")
    name = PurePosixPath(candidate).name
    if name.startswith(CHECKPOINT_PREFIX):
        parent, newest = str(PurePosixPath(candidate).parent), name
    else:
        parent, newest = candidate, None
    selector = pafs.FileSelector(parent, allow_not_found=True)
    names = sorted((info.base_name for info in filesystem.get_file_info(selector)
                    if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)),
                   reverse=True)
    older = [entry for entry in names if newest is None or entry <= newest]
    if newest is not None and newest not in older:
        older.insert(0, newest)
    return [f"{parent}/{entry}" for entry in older]


def _read(filesystem: pafs.FileSystem, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def _sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""What makes a directory a complete, authentic xcm checkpoint, and which checkpoint of a run to resume from.

One checkpoint, as Ray Train stores it under the run directory ``<storage_path>/<job name>-<run id[:8]>/``
(Ray merges every rank's files into it):

    step-00000010/
      deepspeed/latest, deepspeed/step-10/...   DeepSpeed engine state: module, every rank's optimizer shard,
                                                LR schedule (when the engine has one)
      xcm/state.json        step, data position, world size, ZeRO stage, MLflow run id, DeepSpeed tag, session
      xcm/job.yaml          the resolved job spec, itself a loadable job file
      xcm/config.json       the model's transformers config (what ``xcm export`` rebuilds the model from)
      xcm/<side job>.json   each side job's state (xcm/partition.json: the partition)
      xcm/rng-rank-<r>.json python, numpy and torch RNG states of rank r
      xcm/unsent-metrics.jsonl  rank 0's metric spool lines not yet in MLflow when it was written (when any)
      manifest.json         every file above with its size and sha256, and an HMAC-SHA256 over that list

A step trained again after a fallback past its checkpoint (a restart that found it damaged) is saved as
``step-<step>.g<generation>/`` while Ray Train's list still names the earlier save (``save_name``): the newer save
of a step sorts after the earlier ones (``name_order``).

Beside a checkpoint, ``universal-<step>/`` (of ``step-<step>.g<generation>/``: ``universal-<step>.g<generation>/``)
holds its DeepSpeed state in the universal form (made once by ``orchestrator.train.universal`` for a resume on
another worker count), with the same layout, its state marked ``universal``, and a manifest of its own, verified
like any checkpoint's. A resume from an older checkpoint moves
the later ones into ``superseded-<UTC time>/`` (intact) or ``refused-<UTC time>/`` (not verifying, deleted once the
run has an intact checkpoint as new): ``set_aside_newer``.

Ranks upload to storage independently and in no fixed order, so "written last" cannot be an upload order:
a checkpoint counts only when its manifest is there and every file it lists is present with the listed size
and hash. A crash mid-upload, a truncated or corrupted file, a missing manifest: the checkpoint is skipped for
the previous one, with a warning. Storage is any pyarrow filesystem (a local path, ``s3://``...), as in Ray.

Whoever can write the store could otherwise plant a pickle that DeepSpeed unpickles on load, and recompute a
plain checksum; so the manifest is signed with a key the cluster holds (``XCM_CHECKPOINT_KEY``, else a
per-user key file) and verified in this order before any file of the checkpoint is opened: the manifest's
shape, its HMAC, every listed name inside the directory (no ``..``, absolute path, backslash or symlink), no
file the manifest does not list (DeepSpeed globs for shards), then every file's size and sha256. xcm's own
files are JSON; DeepSpeed's shards are pickles, which is why the directory DeepSpeed reads is verified just
before it reads it (``verify_local``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
STATE = "xcm/state.json"
JOB = "xcm/job.yaml"
MODEL_CONFIG = "xcm/config.json"
UNSENT_METRICS = "xcm/unsent-metrics.jsonl"
PARTITION = "xcm/partition.json"  # the partitioner's side-job state, side_job_file("partition")
DEEPSPEED = "deepspeed"
CHECKPOINT_PREFIX = "step-"
UNIVERSAL_PREFIX = "universal-"  # a checkpoint's DeepSpeed universal form, beside it (orchestrator.train.universal)
SUPERSEDED_PREFIX = "superseded-"
REFUSED_PREFIX = "refused-"
METRIC_SPOOL = "mlflow-spool.jsonl"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints, in the run directory
KEY_ENV = "XCM_CHECKPOINT_KEY"
MIN_KEY_BYTES = 32
_CHUNK = 1 << 22
_MAX_MANIFEST_BYTES = 64 << 20
_MAX_STATE_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SIDE_JOB = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NAME = re.compile(r"(step|universal)-([0-9]{8,})(?:\.g([1-9][0-9]*))?")


class CheckpointKeyError(RuntimeError):
    """No usable checkpoint key on this machine: the message says how to provide one."""


class NotIntact(Exception):
    """A checkpoint that must not be used: incomplete, damaged, unauthentic, or escaping its directory."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def rng_file(rank: int) -> str:
    return f"xcm/rng-rank-{rank}.json"


def side_job_file(name: str) -> str:
    """Where a side job's state is kept; its name comes from xcm's code (a registered kind), never from a file."""
    path = f"xcm/{name}.json"
    if not _SIDE_JOB.fullmatch(name) or path in (STATE, MODEL_CONFIG):
        raise ValueError(f"a side job's name is lower-case letters, digits and _, not state or config: {name!r}")
    return path


def checkpoint_name(step: int, generation: int = 0) -> str:
    """``step-<step>``, zero-padded, and ``.g<generation>`` for a step saved again after a fallback past its
    earlier save (``save_name``); ``name_order`` sorts them."""
    return f"{CHECKPOINT_PREFIX}{step:08d}" + (f".g{generation}" if generation else "")


def universal_name(step: int, generation: int = 0) -> str:
    """The universal form of ``checkpoint_name(step, generation)``, beside it."""
    return f"{UNIVERSAL_PREFIX}{step:08d}" + (f".g{generation}" if generation else "")


class NameParts(NamedTuple):
    prefix: str  # CHECKPOINT_PREFIX or UNIVERSAL_PREFIX
    step: int
    generation: int  # 0 for a step's first save


def name_parts(name: str) -> NameParts | None:
    """What a checkpoint directory's name says (None for any name ``checkpoint_name``/``universal_name`` do not
    write)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    parts = NameParts(f"{match[1]}-", int(match[2]), int(match[3] or 0))
    canonical = (checkpoint_name if parts.prefix == CHECKPOINT_PREFIX else universal_name)(parts.step, parts.generation)
    return parts if canonical == name else None


def name_order(name: str) -> tuple[int, int]:
    """Sort key of checkpoint directory names, oldest first: step, then generation (``.g10`` after ``.g9``); a
    name xcm does not write sorts before all."""
    parts = name_parts(name)
    return (-1, 0) if parts is None else (parts.step, parts.generation)


def save_name(filesystem: pafs.FileSystem, run_directory: str, step: int) -> str:
    """The directory name for a new checkpoint of ``step`` (completed steps): ``step-<step>``, or its next
    generation while Ray Train's list of the run's checkpoints names that one.

    A run that fell back past a checkpoint (it did not verify when a worker group restarted) trains those steps
    again. Saved under the old name, the new checkpoint would be merged into the old directory and named twice in
    Ray's list, and ``keep_last`` ageing out the old entry deletes the directory, which is the new checkpoint (and
    then fails deleting it again). A directory of that name that Ray does not list is what a save that never
    registered left (a crash mid-upload): nothing deletes it, and its files would be mixed into the new
    checkpoint's, so it is deleted first. With a list this xcm cannot read, every existing name counts as listed.
    """
    run_directory = run_directory.rstrip("/")
    present = set(_checkpoint_names(filesystem, run_directory))
    listed = ray_listed(filesystem, run_directory)
    taken = present if listed is None else listed
    generation = 0
    while checkpoint_name(step, generation) in taken:
        generation += 1
    name = checkpoint_name(step, generation)
    if name in present:
        logger.warning("deleting %s/%s: a save that Ray Train never registered left it", run_directory, name)
        filesystem.delete_dir(f"{run_directory}/{name}")
    return name


def run_directory_name(job_name: str, run_id: str) -> str:
    """Ray Train's run name for an MLflow run: the same on every start, so a resumed run finds its checkpoints."""
    return f"{job_name}-{run_id[:8]}"


def run_directory(spec: JobSpec, run_id: str) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<checkpointing.storage_path>/<job name>-<run id[:8]>``
    (a URI's query, e.g. MinIO's ``?endpoint_override=...``, stays at the end)."""
    return join(spec.checkpointing.storage_path, run_directory_name(spec.name, run_id))


def join(location: str, name: str) -> str:
    """``location/name`` for a local path or a URI, keeping the URI's query after the path."""
    if "://" not in location:
        return f"{location.rstrip('/')}/{name}"
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def metric_spool_path(spec: JobSpec, run_id: str) -> Path:
    """Rank 0's metric spool: in the run directory on local (or shared) storage, so ``xcm resume`` finds what a
    dead run left unsent; in the local temporary directory when the storage is remote (a spool is appended to
    and locked), where every checkpoint carries its unsent lines over (``UNSENT_METRICS``)."""
    directory = run_directory(spec, run_id)
    if "://" in directory:
        return Path(tempfile.gettempdir()) / "xcm-spool" / run_directory_name(spec.name, run_id) / METRIC_SPOOL
    return Path(directory) / METRIC_SPOOL


# ---- the key -------------------------------------------------------------------------------------------------


def key_file() -> Path:
    return Path.home() / ".config" / "xcm" / "checkpoint.key"


def checkpoint_key(create: bool = False) -> bytes:
    """The key that signs and verifies manifests: ``XCM_CHECKPOINT_KEY`` (on a cluster, a secret every pod
    gets), else this user's key file, which ``create`` makes (32 random bytes, mode 0600) when it is missing.
    The driver and workers of a local run share the machine, hence the file."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        value = value.strip()  # a secret read from a file often ends in a newline that a shell's $(...) drops
        if len(value.encode()) < MIN_KEY_BYTES:
            raise CheckpointKeyError(
                f"{KEY_ENV} holds {len(value.encode())} bytes; a checkpoint key needs at "
                f"least {MIN_KEY_BYTES}: set it to e.g. the output of `openssl rand -hex 32`"
            )
        return value.encode()
    path = key_file()
    if create and not os.path.lexists(path):
        _create_key_file(path)
    return _read_key_file(path)


def key_id(key: bytes) -> str:
    """A name for a key that reveals nothing of it: tells "signed with another key" apart from "altered"."""
    return hmac.new(key, b"xcm checkpoint key id", hashlib.sha256).hexdigest()[:16]


def _create_key_file(path: Path) -> None:
    """Written beside it and linked into place, so that ranks creating it at once all end with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(secrets.token_bytes(MIN_KEY_BYTES))
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(FileExistsError):  # another process created it first: theirs is the key
            os.link(draft, path)
    finally:
        os.unlink(draft)


def _read_key_file(path: Path) -> bytes:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointKeyError(
            f"no checkpoint key: set {KEY_ENV} (on a cluster, the Kubernetes secret every Ray pod gets) to the key "
            f"the run was trained with, or run on the machine whose {path} signed it"
        ) from None
    except OSError as error:
        raise CheckpointKeyError(
            f"cannot read the checkpoint key {path} ({error.strerror}): it must be a plain "
            f"file, not a symlink; or set {KEY_ENV}"
        ) from None
    with os.fdopen(descriptor, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise CheckpointKeyError(
                f"the checkpoint key {path} is not a plain file of this user: remove it "
                f"(a new one is made at the next save) or set {KEY_ENV}"
            )
        if info.st_mode & 0o077:
            raise CheckpointKeyError(
                f"the checkpoint key {path} is open to other users (mode "
                f"{stat.S_IMODE(info.st_mode):03o}): run `chmod 600 {path}`"
            )
        key = stream.read(4096)
    if len(key) < MIN_KEY_BYTES:
        raise CheckpointKeyError(
            f"the checkpoint key {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}: "
            f"remove it (a new one is made at the next save) or set {KEY_ENV}"
        )
    return key


# ---- the state ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointState:
    """The scalars a resumed run needs besides the engine: where it stopped and what wrote it."""

    step: int  # optimizer steps completed; training continues at this step index
    data_position: int  # micro-batches each rank has consumed (the batch stream's start_step)
    world_size: int
    zero_stage: int
    run_id: str  # the MLflow run the metrics go to
    deepspeed_tag: str  # DeepSpeed's directory of this checkpoint under deepspeed/: one path component
    session: str  # the launch (``xcm run`` / ``xcm resume``) that wrote it
    universal: bool = False  # its DeepSpeed state is in the universal form (loads at any worker count)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CheckpointState:
        """Parsed and checked field by field: a state of any other shape is a ValueError."""
        data = json.loads(text)
        names = {field.name for field in fields(cls)}
        if isinstance(data, dict):
            data.setdefault("universal", False)  # written before universal checkpoints
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"expected the fields {sorted(names)}")
        if type(data["universal"]) is not bool:
            raise ValueError("universal must be true or false")
        counts = ("step", "data_position", "world_size", "zero_stage")
        if not all(type(data[name]) is int and data[name] >= 0 for name in counts):
            raise ValueError(f"{', '.join(counts)} must be whole numbers >= 0")
        if data["world_size"] < 1 or data["zero_stage"] > 3:
            raise ValueError("world_size must be >= 1 and zero_stage 0 to 3")
        if not all(isinstance(data[name], str) and data[name] for name in ("run_id", "session")):
            raise ValueError("run_id and session must be non-empty strings")
        tag = data["deepspeed_tag"]
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(f"deepspeed_tag {tag!r} is not a single plain path component")
        return cls(**data)


# ---- where a checkpoint is ----------------------------------------------------------------------------------


class Place(NamedTuple):
    """A location as pyarrow reads it, and the URI query that built its filesystem (kept for later URIs)."""

    filesystem: pafs.FileSystem
    path: str
    query: str = ""


@dataclass(frozen=True)
class Located:
    """A verified checkpoint: where it is and its state."""

    filesystem: pafs.FileSystem
    path: str
    state: CheckpointState
    query: str = ""  # of the URI it was found through, e.g. endpoint_override=127.0.0.1:9000&scheme=http

    @property
    def uri(self) -> str:
        """A string that ``resolve`` and Ray's ``Checkpoint`` both read back to this place, on any machine
        that reaches it: the filesystem's options (an S3 endpoint) travel in the query."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return self.path
        return f"{self.filesystem.type_name}://{self.path}" + (f"?{self.query}" if self.query else "")


def resolve(location: str) -> Place:
    """A local path (absolute or relative) or any URI pyarrow reads, as (filesystem, path, query)."""
    if "://" not in location:
        return Place(pafs.LocalFileSystem(), str(Path(location).expanduser().resolve()))
    filesystem, path = pafs.FileSystem.from_uri(location)
    return Place(filesystem, path, urlsplit(location).query)


# ---- writing ------------------------------------------------------------------------------------------------


def file_records(directory: Path) -> dict[str, dict]:
    """Every file under a local directory as ``relative path -> {size, sha256}``."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        records[path.relative_to(directory).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(pafs.LocalFileSystem(), str(path)),
        }
    return records


def write_manifest(directory: Path, records: dict[str, dict], key: bytes | None = None) -> None:
    """Write and sign the manifest of a checkpoint whose files (of every rank) are ``records``."""
    key = checkpoint_key(create=True) if key is None else key
    listed = {name: record for name, record in records.items() if name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "key_id": key_id(key), "files": listed}
    manifest["hmac"] = _signature(manifest, key)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _signature(manifest: dict, key: bytes) -> str:
    """HMAC-SHA256 of the manifest's canonical JSON (sorted keys, no spaces), its own ``hmac`` field left out."""
    signed = {name: value for name, value in manifest.items() if name != "hmac"}
    canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


# ---- verifying ----------------------------------------------------------------------------------------------


def verified(
    filesystem: pafs.FileSystem, path: str, query: str = "", key: bytes | None = None, name_must_match: bool = True
) -> Located:
    """The checkpoint at ``path`` once it has verified, or NotIntact saying why it must not be used.

    Nothing but the manifest is read before the manifest authenticates; nothing is unpickled at all.
    ``name_must_match``: a ``step-N`` directory must hold step N's state (an authentic checkpoint renamed to
    look newer is not one); a download to a temporary directory has no such name.
    """
    key = checkpoint_key() if key is None else key
    path = path.rstrip("/")
    kind = _file_kind(filesystem, f"{path}/{MANIFEST}")
    if kind is None:
        raise NotIntact(path, "no manifest (the save or upload did not finish)")
    if not kind:
        raise NotIntact(path, f"its {MANIFEST} is not a plain file")
    try:
        manifest = json.loads(_read(filesystem, f"{path}/{MANIFEST}", _MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as error:
        raise NotIntact(path, f"unreadable manifest ({type(error).__name__})") from None
    files = _check_manifest(path, manifest, key)
    _check_listing(filesystem, path, files)
    for name, record in files.items():
        if _sha256(filesystem, f"{path}/{name}") != record["sha256"]:
            raise NotIntact(path, f"{name} does not match its sha256 in the manifest (corrupted)")
    try:
        state = CheckpointState.from_json(_read(filesystem, f"{path}/{STATE}", _MAX_STATE_BYTES))
    except (ValueError, RecursionError) as error:
        raise NotIntact(path, f"unreadable {STATE} ({error})") from None
    if not any(name.startswith(f"{DEEPSPEED}/{state.deepspeed_tag}/") for name in files):
        raise NotIntact(path, f"the DeepSpeed tag {state.deepspeed_tag!r} names no file of the manifest")
    name = PurePosixPath(path).name
    if name_must_match and name.startswith((CHECKPOINT_PREFIX, UNIVERSAL_PREFIX)):
        parts, prefix = name_parts(name), UNIVERSAL_PREFIX if state.universal else CHECKPOINT_PREFIX
        if parts is None or (parts.prefix, parts.step) != (prefix, state.step):
            expected = universal_name(state.step) if state.universal else checkpoint_name(state.step)
            raise NotIntact(path, f"it holds step {state.step}, not the step its name says (it would be {expected})")
    return Located(filesystem, path, state, query)


def problem(filesystem: pafs.FileSystem, path: str) -> str | None:
    """Why the checkpoint at ``path`` must not be used, or None when it is complete, intact and authentic."""
    try:
        verified(filesystem, path)
    except NotIntact as error:
        return error.reason
    return None


def verify_local(directory: Path, expected: CheckpointState) -> None:
    """Verify the local directory that DeepSpeed and xcm are about to read (Ray's download of a remote
    checkpoint, or the checkpoint itself), and that it is the checkpoint that was chosen: NotIntact if not."""
    located = verified(pafs.LocalFileSystem(), str(directory), name_must_match=False)
    if located.state != expected:
        raise NotIntact(str(directory), "it is not the checkpoint that was verified in the store (changed since)")


def _check_manifest(path: str, manifest, key: bytes) -> dict[str, dict]:
    """The manifest's files once its shape and HMAC are right (in that order)."""
    if isinstance(manifest, dict) and manifest.get("format") == 1:
        raise NotIntact(
            path,
            "it predates authenticated checkpoints (manifest format 1): its files are pickles "
            "that this xcm does not open; export its weights with the xcm version that wrote "
            "it (`xcm export ... --to hf DIR`) and start a new run from DIR",
        )
    expected = {"format", "key_id", "files", "hmac"}
    if not isinstance(manifest, dict) or set(manifest) != expected or manifest["format"] != MANIFEST_FORMAT:
        raise NotIntact(path, f"the manifest is not an xcm format-{MANIFEST_FORMAT} manifest")
    files = manifest["files"]
    if not (
        isinstance(files, dict)
        and isinstance(manifest["hmac"], str)
        and isinstance(manifest["key_id"], str)
        and all(_record_shape_ok(record) for record in files.values())
    ):
        raise NotIntact(path, "the manifest is not an xcm format-2 manifest (its files or signature are malformed)")
    if not hmac.compare_digest(manifest["hmac"].encode(), _signature(manifest, key).encode()):
        signer = "another key" if manifest["key_id"] != key_id(key) else "this key, and altered since"
        raise NotIntact(
            path,
            f"its manifest's signature does not verify: signed with {signer} (this machine's key "
            f"is {KEY_ENV}, else {key_file()}; id {key_id(key)}, the manifest's "
            f"{manifest['key_id'][:16]!r})",
        )
    for name in files:
        if reason := _unsafe_name(name):
            raise NotIntact(path, f"the manifest names {name!r}, {reason}")
    if STATE not in files:
        raise NotIntact(path, f"the manifest lists no {STATE}")
    return files


def _file_kind(filesystem: pafs.FileSystem, path: str) -> bool | None:
    """None when nothing is at ``path``; else whether it is a plain file (not a directory, and on a local disk
    not a symlink or a FIFO, which would block the read)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            return None
    kind = filesystem.get_file_info(path).type
    return None if kind == pafs.FileType.NotFound else kind == pafs.FileType.File


def _record_shape_ok(record) -> bool:
    return (
        isinstance(record, dict)
        and set(record) == {"size", "sha256"}
        and type(record["size"]) is int
        and record["size"] >= 0
        and isinstance(record["sha256"], str)
        and bool(_SHA256.fullmatch(record["sha256"]))
    )


def _unsafe_name(name: str) -> str | None:
    """Why a listed name could resolve outside the checkpoint directory, or None for a plain relative path."""
    if not name or "\\" in name or "\x00" in name:
        return "an empty name or one with a backslash or NUL"
    if name.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a path with '..', '.' or an empty component"
    return None


def _check_listing(filesystem: pafs.FileSystem, path: str, files: dict[str, dict]) -> None:
    """Every listed file present with its size, and nothing else: DeepSpeed loads every shard it finds by
    name pattern, listed or not. On a local disk, no symlink anywhere below the checkpoint directory."""
    present = (
        _local_files(path)
        if isinstance(filesystem, pafs.LocalFileSystem)
        else {
            info.path[len(path) + 1 :]: info.size
            for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            if info.type == pafs.FileType.File
        }
    )
    for name, record in files.items():
        if name not in present:
            raise NotIntact(path, f"{name} is missing")
        if present[name] != record["size"]:
            raise NotIntact(path, f"{name} has {present[name]} bytes, the manifest says {record['size']}")
    unlisted = sorted(set(present) - set(files) - {MANIFEST})
    if unlisted:
        raise NotIntact(path, f"{unlisted[0]} is not in the manifest ({len(unlisted)} unlisted file(s))")


def _local_files(path: str) -> dict[str, int]:
    """Relative name -> size of every file below a local directory, refusing symlinks (files or directories)."""
    present = {}
    for root, directories, names in os.walk(path, followlinks=False):
        for name in directories + names:
            entry = os.path.join(root, name)
            info = os.lstat(entry)
            relative = os.path.relpath(entry, path).replace(os.sep, "/")
            if stat.S_ISLNK(info.st_mode):
                raise NotIntact(path, f"{relative} is a symbolic link (a checkpoint holds none)")
            if stat.S_ISREG(info.st_mode):
                present[relative] = info.st_size
    return present


# ---- choosing -----------------------------------------------------------------------------------------------


def read_text(located: Located, name: str) -> str:
    """A file of a verified checkpoint."""
    return _read(located.filesystem, f"{located.path}/{name}")


def newest_intact(filesystem: pafs.FileSystem, candidate: str, query: str = "") -> Located | None:
    """The newest intact checkpoint at or before ``candidate`` (a checkpoint or a run directory).

    Each checkpoint skipped on the way is logged with its problem; None when none verifies.
    """
    located, _ = search(filesystem, candidate, query)
    return located


def search(filesystem: pafs.FileSystem, candidate: str, query: str = "") -> tuple[Located | None, list[NotIntact]]:
    """``newest_intact`` and the reasons of every checkpoint it skipped, newest first."""
    key = checkpoint_key()
    skipped = []
    for path in _candidates(filesystem, candidate):
        try:
            return verified(filesystem, path, query, key), skipped
        except NotIntact as error:
            logger.warning("skipping checkpoint %s: %s; trying the previous one", path, error.reason)
            skipped.append(error)
    return None, skipped


def is_checkpoint_path(location: str) -> bool:
    """Whether ``location`` names one checkpoint (``.../step-N``) rather than a run directory."""
    return PurePosixPath(urlsplit(location).path if "://" in location else location.rstrip("/")).name.startswith(
        CHECKPOINT_PREFIX
    )


class SetAside(NamedTuple):
    """Where ``set_aside_newer`` moved a run's checkpoints after the one resumed from (None: none of that kind)."""

    superseded: str | None  # the intact ones: an abandoned branch, kept until the user deletes it
    refused: str | None  # those that do not verify, until the run has an intact checkpoint as new (``discard_refused``)


def set_aside_newer(located: Located) -> SetAside:
    """Move every checkpoint after ``located`` out of its run directory and out of Ray Train's list of the run's
    checkpoints: the intact ones into ``superseded-<UTC time>/``, those that do not verify into ``refused-<UTC
    time>/``.

    A run continued from an older checkpoint writes the same ``step-N`` names again: Ray would merge its files into
    the old directories, and its restored list (which names the old ones) would delete the new checkpoints as the
    old ones age out. The list is cut back to ``located`` (``_cut_ray_list``), so ``keep_last`` goes on deleting the
    checkpoints up to it in turn. An intact later checkpoint is a branch the user abandoned (a rollback past a
    divergence): it stays whole for them to delete. A refused one (a resume fell back past it) is worth nothing
    once the run has an intact checkpoint at least as new, and keeping it then is a leak no ``keep_last`` deletes;
    until then it is quarantined, not deleted, since "refused" may be an upload that had not finished, or the
    evidence of what damaged it.
    """
    parent, name = str(PurePosixPath(located.path).parent), PurePosixPath(located.path).name
    filesystem = located.filesystem
    newer = [entry for entry in _checkpoint_names(filesystem, parent) if name_order(entry) > name_order(name)]
    if not newer:
        return SetAside(None, None)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    refused = {entry for entry in newer if problem(filesystem, f"{parent}/{entry}") is not None}
    destinations = {}
    for entry in newer:
        prefix = REFUSED_PREFIX if entry in refused else SUPERSEDED_PREFIX
        if prefix not in destinations:
            destinations[prefix] = f"{parent}/{prefix}{stamp}"
            filesystem.create_dir(destinations[prefix])
        _move(filesystem, f"{parent}/{entry}", f"{destinations[prefix]}/{entry}")
    aside = SetAside(destinations.get(SUPERSEDED_PREFIX), destinations.get(REFUSED_PREFIX))
    _cut_ray_list(filesystem, parent, set(_checkpoint_names(filesystem, parent)), aside.superseded or aside.refused)
    return aside


def discard_refused(filesystem: pafs.FileSystem, run_directory: str, query: str = "") -> list[str]:
    """Delete each ``refused-*`` directory of a run whose checkpoints are all at or before the run's newest intact
    checkpoint (the run has an authentic checkpoint at least as new as each, so none holds anything a resume could
    want); their paths. A quarantine whose steps cannot be read from its names stays."""
    run_directory = run_directory.rstrip("/")
    quarantines = _directories(filesystem, run_directory, REFUSED_PREFIX)
    newest = newest_intact(filesystem, run_directory, query) if quarantines else None
    if newest is None:
        return []
    deleted = []
    for quarantine in quarantines:
        path = f"{run_directory}/{quarantine}"
        steps = [name_parts(entry) for entry in _checkpoint_names(filesystem, path)]
        if all(parts is not None and parts.step <= newest.state.step for parts in steps):
            filesystem.delete_dir(path)
            deleted.append(path)
    return deleted


# Ray Train v2's list of a run's checkpoints (``checkpoint_manager_snapshot.json``, its _CheckpointManagerState):
# the fields that name checkpoints, each a list of results ({"checkpoint_dir_name": ..., "metrics": ...}) with a
# list running beside it.
_RAY_RESULTS = {
    "checkpoint_results": "checkpoint_report_indices",
    "pending_training_results": "pending_validation_specs",
}
_RAY_LATEST = "latest_checkpoint_result"
_RAY_NAME_LISTS = (
    "validated_checkpoint_dir_names",
    "timed_out_validation_checkpoint_dir_names",
    "failed_validation_checkpoint_dir_names",
)


def _cut_ray_list(filesystem: pafs.FileSystem, parent: str, kept: set[str], aside: str) -> None:
    """Ray Train's list of the run's checkpoints cut to those named in ``kept`` (the ones left in the run directory:
    Ray refuses to start from a list naming a missing one), its latest the newest one left, so that the resumed
    run's Ray restores them and ages them out with ``keep_last``. A list of a shape this xcm does not know (another
    Ray version) is moved into ``aside`` instead: Ray then starts a new list, and the checkpoints up to the one
    resumed from stay until deleted by hand."""
    path = f"{parent}/{RAY_SNAPSHOT}"
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return
    try:
        cut = _only_checkpoints(json.loads(_read(filesystem, path, _MAX_MANIFEST_BYTES)), kept)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning(
            "Ray Train's list of checkpoints %s is not in a shape this xcm knows (%s: %s): moved to %s, and the "
            "checkpoints up to the one resumed from are no longer deleted by keep_last",
            path,
            type(error).__name__,
            error,
            aside,
        )
        _move(filesystem, path, f"{aside}/{RAY_SNAPSHOT}")
        return
    draft = f"{parent}/.{RAY_SNAPSHOT}.{secrets.token_hex(4)}"  # never half a list: written whole, then renamed
    with filesystem.open_output_stream(draft) as stream:
        stream.write(json.dumps(cut).encode())
    _move(filesystem, draft, path)


def _only_checkpoints(snapshot: dict, kept: set[str]) -> dict:
    """``snapshot`` (Ray's list) with only the results naming a checkpoint of ``kept``; KeyError, TypeError or
    ValueError when it is not the shape this xcm knows."""
    cut = dict(snapshot)
    for results, beside in _RAY_RESULTS.items():
        if len(snapshot[results]) != len(snapshot[beside]):
            raise ValueError(f"{results} and {beside} differ in length")
        kept = [
            (result, other)
            for result, other in zip(snapshot[results], snapshot[beside], strict=True)
            if result["checkpoint_dir_name"] in kept
        ]
        cut[results], cut[beside] = [result for result, _ in kept], [other for _, other in kept]
    for names in _RAY_NAME_LISTS:
        cut[names] = [name for name in snapshot[names] if name in kept]
    latest = snapshot[_RAY_LATEST]
    if latest is not None and latest["checkpoint_dir_name"] not in kept:
        indexed = zip(cut["checkpoint_results"], cut["checkpoint_report_indices"], strict=True)
        cut[_RAY_LATEST] = max(indexed, key=lambda pair: pair[1])[0] if cut["checkpoint_results"] else None
    return cut


def ray_listed(filesystem: pafs.FileSystem, run_directory: str) -> set[str] | None:
    """The checkpoint directory names Ray Train's list of the run's checkpoints holds (none before its first
    checkpoint); None, with a warning, for a list of a shape this xcm does not know."""
    path = f"{run_directory}/{RAY_SNAPSHOT}"
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    try:
        snapshot = json.loads(_read(filesystem, path, _MAX_MANIFEST_BYTES))
        latest = snapshot[_RAY_LATEST]
        results = [result for name in _RAY_RESULTS for result in snapshot[name]] + ([latest] if latest else [])
        names = {result["checkpoint_dir_name"] for result in results}
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ray Train's list of checkpoints %s is not in a shape this xcm knows (%s)", path, error)
        return None
    if not all(isinstance(name, str) for name in names):
        logger.warning("Ray Train's list of checkpoints %s names a checkpoint by something else than a name", path)
        return None
    return names


def _move(filesystem: pafs.FileSystem, source: str, destination: str) -> None:
    """A rename where the filesystem has one; on object stores (no directory rename), a copy then a delete."""
    try:
        filesystem.move(source, destination)
    except (NotImplementedError, OSError):
        if filesystem.get_file_info(source).type == pafs.FileType.File:
            filesystem.copy_file(source, destination)
            filesystem.delete_file(source)
            return
        pafs.copy_files(source, destination, source_filesystem=filesystem, destination_filesystem=filesystem)
        filesystem.delete_dir(source)


def _checkpoint_names(filesystem: pafs.FileSystem, parent: str) -> list[str]:
    """The ``step-*`` directories of a run directory, newest first (``name_order``)."""
    return sorted(_directories(filesystem, parent, CHECKPOINT_PREFIX), key=name_order, reverse=True)


def _directories(filesystem: pafs.FileSystem, parent: str, prefix: str) -> list[str]:
    """The names of ``parent``'s directories that start with ``prefix``, last in name order first."""
    selector = pafs.FileSelector(parent, allow_not_found=True)
    return sorted(
        (
            info.base_name
            for info in filesystem.get_file_info(selector)
            if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)
        ),
        reverse=True,
    )


def _candidates(filesystem: pafs.FileSystem, candidate: str) -> list[str]:
    """``candidate`` and the older checkpoints beside it, newest first; a run directory's checkpoints, newest first."""
    candidate = candidate.rstrip("/")
    name = PurePosixPath(candidate).name
    if name.startswith(CHECKPOINT_PREFIX):
        parent, newest = str(PurePosixPath(candidate).parent), name
    else:
        parent, newest = candidate, None
    names = _checkpoint_names(filesystem, parent)
    older = [entry for entry in names if newest is None or name_order(entry) <= name_order(newest)]
    if newest is not None and newest not in older:
        older.insert(0, newest)
    return [f"{parent}/{entry}" for entry in older]


def _read(filesystem: pafs.FileSystem, path: str, limit: int | None = None) -> str:
    """A text file; one larger than ``limit`` bytes is a ValueError (never read whole)."""
    with filesystem.open_input_stream(path) as stream:
        data = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode()


def _sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

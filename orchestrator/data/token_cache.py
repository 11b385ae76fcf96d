"""Tokenized, packed blocks cached on disk as Arrow IPC files, so a second run skips tokenization.

An entry is a directory named by a hash of everything that decides its tokens (the source and its files'
sizes and modification times, the text field, the held-out fraction, the tokenizer's vocabulary, the block
size). It is written under a file lock into a temporary directory and renamed into place, so ranks that
prepare the same data at once tokenize it once and a crash never leaves a half-written entry. Readers
memory-map the files: a rank touches only the rows of its own shard, and ranks on one machine share pages.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the tokenize-and-pack pipeline changes what an entry holds
_DESCRIPTION_FILE = "description.json"


@dataclass(frozen=True)
class CachedSplits:
    """The blocks of one cache entry, by split name (``train``, ``validation``), memory-mapped."""

    path: Path
    splits: dict[str, torch.Tensor]  # name -> [n_blocks, block_size + 1] int32
    created: bool  # True when this call tokenized and wrote the entry; False when it was already there


def cache_key(description: dict) -> str:
    """A stable hash of what decides an entry's tokens."""
    canonical = json.dumps({"cache_format": CACHE_FORMAT, **description}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cached_blocks(cache_dir: Path, description: dict, build: Callable[[], dict[str, np.ndarray]]) -> CachedSplits:
    """Return the entry for ``description``; call ``build`` (split -> [n, width] array) only when it is missing."""
    entry = cache_dir / f"{description.get('source', 'data')}-{cache_key(description)}"
    created = False
    if not entry.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f"{entry.name}.lock"):
            if not entry.is_dir():  # another process may have written it while this one waited for the lock
                _write_entry(entry, description, build())
                created = True
    splits = {path.stem: read_blocks(path) for path in sorted(entry.glob("*.arrow"))}
    return CachedSplits(path=entry, splits=splits, created=created)


def write_blocks(path: Path, blocks: np.ndarray) -> None:
    """Write [n_blocks, width] token ids as one Arrow record batch: a fixed-size list of int32 per block."""
    import pyarrow as pa

    width = blocks.shape[1]
    flat = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, width)
    batch = pa.record_batch([column], names=["tokens"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def read_blocks(path: Path) -> torch.Tensor:
    """Memory-map an entry's file as a read-only int32 tensor [n_blocks, width] (no copy)."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    column = table.column("tokens")
    width = column.type.list_size
    flat = column.chunk(0).values.to_numpy(zero_copy_only=True) if column.num_chunks else np.empty(0, np.int32)
    with warnings.catch_warnings():
        # The mapping is read-only by design: blocks are only ever indexed (which copies), never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat).view(-1, width)


def _write_entry(entry: Path, description: dict, splits: dict[str, np.ndarray]) -> None:
    staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, blocks in splits.items():
        write_blocks(staging / f"{name}.arrow", blocks)
    counts = {name: len(blocks) for name, blocks in splits.items()}
    (staging / _DESCRIPTION_FILE).write_text(json.dumps({**description, "blocks": counts}, indent=2, sort_keys=True))
    staging.rename(entry)
    logger.info("xcm data: cached %s blocks in %s", counts, entry)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

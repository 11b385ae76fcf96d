"""Text from a hub dataset or local text, JSONL and Parquet files, tokenized, packed and cached as Arrow.

The ``datasets`` library reads the documents; xcm tokenizes them in batches with the job's tokenizer, joins
them with its end-of-text token, cuts the stream into blocks of ``block_size + 1`` tokens and caches the
blocks (``token_cache``), so a second run with the same data, tokenizer and block size skips all of it.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.data.token_cache import cached_blocks
from orchestrator.data.tokenizer import TextTokenizer, load_tokenizer
from orchestrator.data.training_data import DataError, TrainingData

if TYPE_CHECKING:
    import datasets

    from orchestrator.spec import DataSpec, ModelSpec

logger = logging.getLogger(__name__)

FORMATS_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
DEFAULT_CACHE_DIR = Path("xcm-runs") / "data-cache"
_DOCUMENTS_PER_BATCH = 1000


def build_text_data(data: DataSpec, model: ModelSpec) -> TrainingData:
    """Train and validation blocks of a hub dataset or local files, from the token cache when it holds them."""
    tokenizer = load_tokenizer(data, model)
    cache_dir = Path(data.cache_dir) if data.cache_dir else DEFAULT_CACHE_DIR
    cached = cached_blocks(cache_dir, describe(data, tokenizer), lambda: tokenize_splits(data, tokenizer))
    return TrainingData(
        train=cached.splits["train"],
        validation=cached.splits.get("validation"),
        tokenizer=tokenizer,
        cache_hit=not cached.created,
    )


def describe(data: DataSpec, tokenizer: TextTokenizer) -> dict:
    """Everything that decides the blocks' tokens: the token cache's key."""
    held_out = holds_out(data)
    description = {
        "source": data.source,
        "text_field": data.text_field,
        "block_size": data.block_size,
        "tokenizer": tokenizer.identity,
        "held_out_fraction": data.validation_fraction if held_out else None,
    }
    if data.source == "hub":
        return {
            **description,
            "dataset": data.dataset,
            "dataset_config": data.dataset_config,
            "split": data.split,
            "validation_split": None if held_out else data.validation_split,
        }
    return {
        **description,
        "format": file_format(data),
        "files": [_file_identity(path) for path in expand_files(data.files)],
        "validation_files": [
            _file_identity(path) for path in expand_files(data.validation_files, "data.validation_files")
        ],
    }


def separate_validation(data: DataSpec) -> bool:
    """True when validation has its own documents: the hub dataset's validation split, or validation files."""
    return bool(data.validation_split if data.source == "hub" else data.validation_files)


def holds_out(data: DataSpec) -> bool:
    """True when validation documents are held out of the training documents instead."""
    return not separate_validation(data) and data.validation_fraction > 0


def tokenize_splits(data: DataSpec, tokenizer: TextTokenizer) -> dict[str, np.ndarray]:
    """Read, tokenize and pack every split: {"train": [n, block_size + 1], "validation": ...} int32."""
    train, validation = BlockPacker(tokenizer, data.block_size), BlockPacker(tokenizer, data.block_size)
    fraction = data.validation_fraction if holds_out(data) else 0.0
    for texts in documents(data, "train"):
        train.add([text for text in texts if not is_held_out(text, fraction)])
        validation.add([text for text in texts if is_held_out(text, fraction)])
    if separate_validation(data):
        for texts in documents(data, "validation"):
            validation.add(texts)
    splits = {"train": train.blocks("the training documents", "data.block_size")}
    if validation.documents:
        key = (
            "data.validation_fraction"
            if holds_out(data)
            else "data.validation_split"
            if data.source == "hub"
            else "data.validation_files"
        )
        splits["validation"] = validation.blocks("the validation documents", key)
    logger.info("xcm data: %d training and %d validation documents tokenized", train.documents, validation.documents)
    return splits


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of its text, so the choice is the same on every run
    and machine whatever the order, and duplicates never straddle the two splits."""
    return zlib.crc32(text.encode("utf-8")) < fraction * 2**32


class BlockPacker:
    """Appends documents' tokens, each followed by end-of-text, and cuts the stream into blocks at the end."""

    def __init__(self, tokenizer: TextTokenizer, block_size: int):
        self.tokenizer, self.width = tokenizer, block_size + 1
        self.documents = 0
        self._chunks: list[np.ndarray] = []

    def add(self, texts: Sequence[str]) -> None:
        if not texts:
            return
        ids = [token for encoded in self.tokenizer.encode_batch(texts) for token in (*encoded, self.tokenizer.eos_id)]
        self._chunks.append(np.asarray(ids, dtype=np.int32))
        self.documents += len(texts)

    def blocks(self, what: str, key: str) -> np.ndarray:
        """[n_blocks, block_size + 1]; tokens past the last whole block are dropped."""
        stream = np.concatenate(self._chunks) if self._chunks else np.empty(0, np.int32)
        n_blocks = len(stream) // self.width
        if n_blocks == 0:
            raise DataError(
                key,
                f"{what} ({self.documents}) give {len(stream)} tokens, fewer than one block of "
                f"block_size + 1 = {self.width}",
                "add text or lower data.block_size",
            )
        return stream[: n_blocks * self.width].reshape(n_blocks, self.width)


def documents(data: DataSpec, split: str) -> Iterator[list[str]]:
    """Batches of non-blank document texts of the train or validation split."""
    dataset = load_split(data, split)
    for batch in dataset.select_columns([data.text_field]).iter(batch_size=_DOCUMENTS_PER_BATCH):
        yield [text for text in batch[data.text_field] if text and not text.isspace()]


def load_split(data: DataSpec, split: str) -> datasets.Dataset:
    """The split as a ``datasets.Dataset``, checked to hold a text column named ``data.text_field``."""
    dataset, what = _load_hub(data, split) if data.source == "hub" else _load_files(data, split)
    feature = dataset.features.get(data.text_field)
    if feature is None:
        raise DataError(
            "data.text_field",
            f"{what} has no column {data.text_field!r} (columns: {', '.join(dataset.column_names)})",
            "set data.text_field to the column that holds the text",
        )
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(
            "data.text_field",
            f"column {data.text_field!r} of {what} holds {feature}, not text",
            "set data.text_field to a column of strings",
        )
    return dataset


def _load_hub(data: DataSpec, split: str) -> tuple[datasets.Dataset, str]:
    import datasets

    name = data.split if split == "train" else data.validation_split
    what = f"hub dataset {data.dataset!r} (config {data.dataset_config!r}, split {name!r})"
    try:
        return datasets.load_dataset(data.dataset, data.dataset_config, split=name), what
    except Exception as error:  # datasets raises many types: unreachable hub, unknown name, config or split
        raise DataError(
            "data.dataset",
            f"{what} cannot be loaded ({type(error).__name__}: {error})",
            "check data.dataset, data.dataset_config and the split names; offline (HF_HUB_OFFLINE=1 or no "
            "network) only datasets already in the Hugging Face cache load, so download it once where "
            "the hub is reachable, or save its text to local files and use source: files with "
            "data.files",
        ) from error


def _load_files(data: DataSpec, split: str) -> tuple[datasets.Dataset, str]:
    import datasets

    key = "files" if split == "train" else "validation_files"
    paths = expand_files(getattr(data, key), f"data.{key}")
    fmt = file_format(data)
    what = f"{fmt} files {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"
    # One document per paragraph (blank-line separated): line breaks inside it are kept.
    options = {"sample_by": "paragraph"} if fmt == "text" else {}
    cache_dir = Path(data.cache_dir) if data.cache_dir else DEFAULT_CACHE_DIR
    try:
        return datasets.load_dataset(
            fmt, data_files=paths, split="train", cache_dir=str(cache_dir / "datasets"), **options
        ), what
    except Exception as error:  # a malformed file: datasets raises its parser's error types
        raise DataError(
            "data.files",
            f"{what} cannot be read as {fmt} ({type(error).__name__}: {error})",
            "check the files' contents, or set data.format to their real format",
        ) from error


# A job file is untrusted input: a pattern such as /**/x walks every directory of the machine (network mounts
# included) before it matches anything, so the walk gets this long and the pattern is refused after it.
PATTERN_WALK_LIMIT_S = 20.0


def expand_files(patterns: Sequence[str], key: str = "data.files") -> list[str]:
    """The files that the paths or glob patterns name, in a stable order; patterns matching nothing drop out. A
    DataError naming ``key`` for a pattern still walking after PATTERN_WALK_LIMIT_S."""
    return [path for pattern in patterns for path in pattern_matches(pattern, key) if os.path.isfile(path)]


def pattern_matches(pattern: str, key: str) -> list[str]:
    """glob's matches of one pattern, on a thread that is abandoned (a daemon) when the walk is too long."""
    found: list[list[str]] = []
    walk = threading.Thread(
        target=lambda: found.append(sorted(glob.glob(os.path.expanduser(pattern), recursive=True))), daemon=True
    )
    walk.start()
    walk.join(PATTERN_WALK_LIMIT_S)
    if not found:
        raise DataError(
            key,
            f"{pattern} still walks the filesystem after {PATTERN_WALK_LIMIT_S:g} s",
            "start the pattern at the directory that holds the files (a ** near / visits every directory)",
        )
    return found[0]


def missing_patterns(patterns: Sequence[str], key: str = "data.files") -> list[str]:
    """The paths or patterns that name no file."""
    return [pattern for pattern in patterns if not expand_files([pattern], key)]


def file_format(data: DataSpec) -> str:
    """``data.format``, or the one the files' suffixes name; a DataError when neither decides it."""
    if data.format:
        return data.format
    suffixes = {Path(path).suffix.lower() for path in expand_files([*data.files, *data.validation_files])}
    formats = {FORMATS_BY_SUFFIX.get(suffix) for suffix in suffixes}
    if len(formats) != 1 or None in formats:
        raise DataError(
            "data.format",
            f"the files' suffixes {sorted(suffixes)} do not name one format",
            f"set data.format to text, json or parquet (suffixes known: {', '.join(FORMATS_BY_SUFFIX)})",
        )
    return formats.pop()


def _file_identity(path: str) -> dict:
    status = os.stat(path)
    return {"path": os.path.abspath(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns}

"""A checkpoint in DeepSpeed's universal form, for ``xcm resume`` onto another worker count.

ZeRO splits the optimizer state (and under ZeRO-3 the weights) ``world_size`` ways, and DeepSpeed loads such a
checkpoint only at the data-parallel degree that wrote it. Its universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``) stores every parameter's fp32 weights and optimizer moments whole,
one file each, and an engine built with ``checkpoint.load_universal`` loads it at any degree. The conversion is
made once per checkpoint and kept beside it, ``universal-<step>/``, with the same layout as a checkpoint
(``deepspeed/<tag>/`` in the universal form, xcm's own files copied, ``state.json`` marked universal) and a manifest
signed like any other: it is verified before anything of it is read, as a checkpoint is. The conversion itself
unpickles the shards, so it reads a local copy of the source checkpoint only after that copy has verified.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from orchestrator.train import checkpoint_store as store

logger = logging.getLogger(__name__)


def universal_checkpoint(located: store.Located) -> store.Located:
    """The universal form of the verified checkpoint ``located``: the one kept beside it when it verifies and was
    made from it, else converted now (and kept)."""
    source = PurePosixPath(located.path)
    parts = store.name_parts(source.name)  # a step saved again after a fallback has a universal form of its own
    target = f"{source.parent}/{store.universal_name(located.state.step, parts.generation if parts else 0)}"
    if located.filesystem.get_file_info(target).type == pafs.FileType.NotFound:
        logger.info("converting %s to DeepSpeed's universal checkpoint (once)", located.uri)
    else:
        try:
            kept = store.verified(located.filesystem, target, located.query)
            if kept.state == universal_state(located.state):
                return kept
            logger.warning("%s was made from another checkpoint: converting %s again", target, located.uri)
        except store.NotIntact as error:
            logger.warning("%s cannot be used (%s): converting %s again", target, error.reason, located.uri)
    with tempfile.TemporaryDirectory(prefix="xcm-universal-") as work:
        source = _verified_local_copy(located, Path(work) / "source")
        staging = Path(work) / "universal"
        convert(source, staging, located.state)
        store.write_manifest(staging, store.file_records(staging))
        _publish(staging, located.filesystem, target)
    return store.verified(located.filesystem, target, located.query)


def universal_state(state: store.CheckpointState) -> store.CheckpointState:
    return dataclasses.replace(state, universal=True)


def convert(source: Path, destination: Path, state: store.CheckpointState) -> None:
    """Write the universal form of the verified local checkpoint ``source`` into ``destination``: DeepSpeed's
    conversion of its engine state, xcm's files as they are (``state.json`` marked universal)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.copytree(source / "xcm", destination / "xcm")
    (destination / store.STATE).write_text(universal_state(state).to_json())
    output = destination / store.DEEPSPEED / state.deepspeed_tag
    with contextlib.redirect_stdout(_LogLines()):  # it prints its progress
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(source / store.DEEPSPEED / state.deepspeed_tag),
                output_folder=str(output),
                num_extract_workers=1,  # no process pool: the work is small next to training, and runs once
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # the version marker that Megatron writes and xcm's checkpoints lack
            )
        )


def _verified_local_copy(located: store.Located, scratch: Path) -> Path:
    """A local directory holding ``located`` that has verified just now: the checkpoint itself on a local disk,
    else a download of it."""
    if isinstance(located.filesystem, pafs.LocalFileSystem):
        directory = Path(located.path)
    else:
        pafs.copy_files(
            located.path,
            str(scratch),
            source_filesystem=located.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        directory = scratch
    store.verify_local(directory, located.state)
    return directory


def _publish(staging: Path, filesystem: pafs.FileSystem, target: str) -> None:
    """Put the signed conversion at ``target``, replacing one that did not verify. On a local disk it is moved in
    whole; on an object store an upload cut short leaves a manifest that does not match, and the next resume
    converts again."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        landing = Path(target).with_name(f".{Path(target).name}-{uuid.uuid4().hex[:8]}")
        shutil.copytree(staging, landing)
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.rename(landing, target)
        return
    if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
        filesystem.delete_dir(target)
    pafs.copy_files(str(staging), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


class _LogLines:
    """A text stream that logs each line at DEBUG level."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logger.debug("ds_to_universal: %s", line)
        return len(text)

    def flush(self) -> None:
        pass

"""``xcm export <checkpoint> --to hf <dir>``: a Hugging Face model directory from a run's ZeRO checkpoint.

The weights are consolidated by DeepSpeed's own ``zero_to_fp32`` (which reassembles every rank's fp32
optimizer partition, ZeRO 1-3); the model is rebuilt from the transformers config saved in the checkpoint and
written with ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it anywhere. The
partition it was trained under goes beside it as ``partition.parquet`` (one row per unit: group, matrix,
side, unit, cluster, the same table as the run's MLflow artifact).

The export is written to a temporary directory beside ``DIR`` and renamed into place once complete, so a
failure leaves ``DIR`` as it was; a ``DIR`` that is not empty is refused unless ``overwrite``, and then
replaced only by a complete export.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import torch

from orchestrator.train import checkpoint_store as store

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

PARTITION_FILE = "partition.parquet"
PROVENANCE_FILE = "xcm-export.json"


class ExportError(RuntimeError):
    """The checkpoint cannot be written in the requested format."""


def export_hf(target: str, out_dir: Path, tracking_uri: str, overwrite: bool = False) -> Path:
    """Write the checkpoint ``target`` names (a checkpoint exactly; a run directory's or run id's newest intact
    one) to ``out_dir``, which must be missing or empty unless ``overwrite``."""
    from orchestrator.train.resume import locate

    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)
    located = locate(target, tracking_uri)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.xcm-export-", dir=out_dir.parent))
    try:
        _write_export(located, staging)
        _put_in_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_export(located: store.Located, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="xcm-export-") as scratch:
        local = local_copy(located, Path(scratch))
        if not (local / store.MODEL_CONFIG).is_file():
            raise ExportError(
                f"checkpoint {located.uri} holds a model that is not a transformers model (xcm's "
                "MLP, CNN or modular-addition transformer): --to hf exports transformers families"
            )
        model = consolidated_model(local, located.state)
        model.save_pretrained(out_dir)
        partition_state = json.loads((local / store.PARTITION).read_text())
        if partition_state is not None:
            _write_partition(model, local, partition_state, out_dir / PARTITION_FILE)
    (out_dir / PROVENANCE_FILE).write_text(
        json.dumps(
            {
                "checkpoint": located.uri,
                "mlflow_run_id": located.state.run_id,
                "step": located.state.step,
                "partition": PARTITION_FILE if partition_state is not None else None,
            },
            indent=2,
        )
    )


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over something that is there, unless told to."""
    if overwrite or not os.path.lexists(out_dir):
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        return
    raise ExportError(
        f"{out_dir} exists and is not an empty directory: export to a new directory, or pass "
        "--overwrite to replace it (only once the new export is complete)"
    )


def _put_in_place(staging: Path, out_dir: Path) -> None:
    """Rename the complete export to ``out_dir``; what was there is removed only after the rename."""
    if not os.path.lexists(out_dir) or (out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())):
        os.replace(staging, out_dir)  # replaces an empty directory too
        return
    previous = out_dir.with_name(f".{out_dir.name}.xcm-replaced-{secrets.token_hex(4)}")
    os.rename(out_dir, previous)
    try:
        os.rename(staging, out_dir)
    except OSError:
        os.rename(previous, out_dir)
        raise
    if previous.is_dir() and not previous.is_symlink():
        shutil.rmtree(previous)
    else:
        previous.unlink()


def consolidated_state_dict(checkpoint: Path, state: store.CheckpointState) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a local checkpoint, by parameter name."""
    deepspeed_dir = checkpoint / store.DEEPSPEED
    if state.zero_stage == 0:  # no ZeRO: rank 0's model file holds the whole module
        module = torch.load(
            deepspeed_dir / state.deepspeed_tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )["module"]
        return {name: tensor.float() for name, tensor in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=state.deepspeed_tag)


def consolidated_model(checkpoint: Path, state: store.CheckpointState) -> torch.nn.Module:
    """The transformers model of a local checkpoint: its saved config with the full fp32 weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint / Path(store.MODEL_CONFIG).parent)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(consolidated_state_dict(checkpoint, state), strict=True)
    return model


def _write_partition(model: torch.nn.Module, checkpoint: Path, partition_state: dict, path: Path) -> None:
    import pyarrow.parquet as pq

    from orchestrator.modularity import GroupPartition, find_matrix_groups
    from orchestrator.partitioning.table import partition_table

    groups = find_matrix_groups(model, checkpoint_spec(checkpoint).modularity.matrices)
    partitions = {name: GroupPartition.from_dict(data) for name, data in partition_state["partitions"].items()}
    pq.write_table(partition_table(groups, partitions), path)


def checkpoint_spec(checkpoint: Path) -> JobSpec:
    """The job a local checkpoint was trained with, as it saved it."""
    from orchestrator.spec import JobSpec, read_job

    raw, _ = read_job(checkpoint / store.JOB)  # a job file's bounds (size, aliases, nesting) hold for a checkpoint's
    return JobSpec.model_validate(raw)


def local_copy(located: store.Located, scratch: Path) -> Path:
    """The checkpoint as a verified local directory: itself on local storage (``locate`` has just verified
    it), else a download, verified in turn before anything reads it."""
    if isinstance(located.filesystem, pafs.LocalFileSystem):
        return Path(located.path)
    pafs.copy_files(
        located.path, str(scratch), source_filesystem=located.filesystem, destination_filesystem=pafs.LocalFileSystem()
    )
    try:
        store.verify_local(scratch, located.state)
    except store.NotIntact as error:
        raise ExportError(
            f"the download of {located.uri} does not verify, so nothing of it is read: {error.reason}"
        ) from None
    return scratch

"""``xcm circuits``: loads the model a source names, then measures and reports it with ``circuit_report``.

The model is loaded as ``xcm measure`` loads it: a ``save_pretrained`` directory (with the ``partition.parquet``
``xcm export`` writes beside it, when there), a hub name, or an xcm checkpoint (a run directory, a ``step-*``
checkpoint or the MLflow run id), which is located and verified against its signed manifest before any of its
files is read. The partition is the checkpoint's (or the export's) when it has one, else a fresh spectral one.

Loading reaches the trainer's checkpoint store, so this module stands above ``orchestrator.train``; the computing
half in ``circuit_report`` stands below it, where the circuits side job that training starts imports it.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchestrator import metric_names
from orchestrator.circuit_report import (
    CircuitsError,
    LoadedModel,
    find_circuits,
    format_table,
    fresh_partitions,
    language_loaded,
    loaded_model_from_spec,
    log_result,
    methods_for,
    model_kind,
    task_set_for,
)

if TYPE_CHECKING:
    from orchestrator.data.tokenizer import TextTokenizer
    from orchestrator.modularity import GroupPartition
    from orchestrator.spec import CircuitsSpec, JobSpec

MAX_PARTITION_BYTES = 64 << 20
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def run_circuits_command(
    source: str,
    task_specs: Sequence[str],
    options: CircuitsSpec,
    k: int,
    tracking_uri: str,
    experiment: str = metric_names.CIRCUITS_EXPERIMENT,
    workdir: Path | None = None,
    examples: str | None = None,
) -> int:
    """``xcm circuits``: load, choose the partition and tasks, compute, print the table, log the run; the exit
    status (1 with one line on stderr for a model, task or store it cannot use). `examples` overrides a
    classifier checkpoint's ``circuits.examples`` (None: its job's)."""
    from orchestrator import tracking
    from orchestrator.credentials import redact
    from orchestrator.data.training_data import DataError
    from orchestrator.train.export import ExportError
    from orchestrator.train.resume import ResumeError

    workdir = workdir or Path.cwd()
    try:
        progress(f"loading {source}")
        loaded = load_for_circuits(source, tracking_uri, examples)
        methods = methods_for(options.method, loaded.kind)
        task_set = task_set_for(loaded, task_specs, options, workdir)
        if loaded.partitions is not None:
            origin = "the checkpoint's" if "checkpoint" in loaded.provenance else "partition.parquet beside the model"
            partitions, partition_source = loaded.partitions, origin
        else:
            partitions, partition_source = fresh_partitions(loaded.model, k, loaded.matrices), "fresh spectral"
        result = find_circuits(loaded, task_set, partitions, partition_source, methods, options, progress)
        print(format_table(result))
        params = loaded.provenance | _params(options, methods, task_specs, task_set, partition_source, k)
        run_id = log_result(result, loaded, partitions, params, tracking_uri, experiment, workdir)
    except (OSError, ValueError, ResumeError, ExportError, DataError, tracking.TrackingUnavailable) as error:
        print(redact(f"xcm circuits: {error}").splitlines()[0], file=sys.stderr)
        return 1
    print(f"\nxcm: logged to MLflow run {run_id} (experiment {experiment}) in {tracking_uri}")
    return 0


def _params(options, methods, task_specs, task_set, partition_source, k) -> dict[str, str]:
    return {
        "methods": ",".join(methods),
        "tasks": ",".join(task_set.names()),
        "task_specs": " ".join(task_specs) or "(the model's own)",
        "partition": partition_source,
        "k": str(k),
        "taus": ",".join(f"{tau:g}" for tau in options.taus),
        "ig_steps": str(options.ig_steps),
        "ablation": options.ablation,
        "null_draws": str(options.null_draws),
        "eval_on_find_data": str(options.eval_on_find_data),
        "seed": str(options.seed),
    }


def progress(message: str) -> None:
    print(f"xcm circuits: {message}", file=sys.stderr, flush=True)


# ---- loading ----------------------------------------------------------------------------------------------------


def load_for_circuits(source: str, tracking_uri: str, examples: str | None = None) -> LoadedModel:
    """The model `source` names, the way ``xcm measure`` takes it, with its partition, tokenizer and data (a
    classifier checkpoint's examples as `examples` picks them, else as its job's ``circuits.examples`` does)."""
    from orchestrator import measure

    path = Path(source)
    directory = (path / "config.json").is_file()
    if not directory and ("://" in source or path.exists() or _RUN_ID.fullmatch(source)):
        return _from_checkpoint(source, tracking_uri, examples)
    if examples is not None:
        raise CircuitsError(LANGUAGE_EXAMPLES)  # a model directory or a hub name: a language model
    if directory:
        return _from_directory(path, measure.load_model(source, tracking_uri))
    return language_loaded(measure.load_model(source, tracking_uri), None, None, {"source": source})


LANGUAGE_EXAMPLES = "--examples picks a classifier's examples; a language model's tasks bring their own: remove it"


def with_examples(spec: JobSpec, examples: str | None) -> JobSpec:
    """`spec` with ``circuits.examples`` set to `examples` (unchanged for None); refused for a language model, and
    held-out examples for a job that held none out."""
    from orchestrator.circuit_report import HELD_OUT_BY_FRACTION, model_kind

    if examples is None:
        return spec
    if model_kind(spec) == "language":
        raise CircuitsError(LANGUAGE_EXAMPLES)
    if examples == "held_out" and spec.data.source in HELD_OUT_BY_FRACTION and spec.data.validation_fraction == 0:
        raise CircuitsError(
            "--examples held_out, but the checkpoint's job held no examples out (data.validation_fraction 0); "
            "use --examples train"
        )
    return spec.model_copy(update={"circuits": spec.circuits.model_copy(update={"examples": examples})})


def _from_directory(path: Path, model: nn.Module) -> LoadedModel:
    from orchestrator.train.export import PARTITION_FILE

    partition_file = path / PARTITION_FILE
    partitions = read_partition_table(partition_file, model) if partition_file.is_file() else None
    return language_loaded(model, partitions, _directory_tokenizer(path, model), {"source": str(path)})


def _directory_tokenizer(path: Path, model: nn.Module) -> TextTokenizer | None:
    """The directory's own tokenizer, else xcm's byte tokenizer for a model with exactly its vocabulary."""
    from orchestrator.data.tokenizer import ByteTokenizer, PretrainedTokenizer

    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return PretrainedTokenizer(str(path))
    return ByteTokenizer() if model.config.vocab_size == ByteTokenizer.vocab_size else None


def _from_checkpoint(source: str, tracking_uri: str, examples: str | None = None) -> LoadedModel:
    """Located and verified (signature, then every file's hash) before anything in it is read, as export does."""
    from orchestrator import measure
    from orchestrator.train import checkpoint_store as store
    from orchestrator.train.export import checkpoint_spec, local_copy
    from orchestrator.train.resume import locate

    located = locate(source, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="xcm-circuits-") as scratch:
        local = local_copy(located, Path(scratch))
        spec = with_examples(checkpoint_spec(local), examples)
        model = measure.checkpoint_model(local, located.state, spec)
        partition_file = local / store.PARTITION
        state = json.loads(partition_file.read_text()) if partition_file.is_file() else None
    provenance = {"source": source, "checkpoint": located.uri, "trained_run_id": located.state.run_id}
    if model_kind(spec) == "classifier":
        provenance["examples"] = spec.circuits.examples
    return loaded_model_from_spec(spec, model, _partitions_from_state(state), located.state.step, provenance)


def _partitions_from_state(state) -> dict[str, GroupPartition] | None:
    from orchestrator.modularity import GroupPartition

    if state is None or state.get("partitions") is None:
        return None
    return {name: GroupPartition.from_dict(data) for name, data in state["partitions"].items()}


def read_partition_table(path: Path, model: nn.Module) -> dict[str, GroupPartition]:
    """The group partitions of an export's ``partition.parquet`` (group, matrix, side, unit, cluster), each
    checked against the model's matrices: a table that does not fit the model is refused, not guessed at."""
    import pyarrow.parquet as pq

    from orchestrator.modularity import find_matrix_groups

    if path.stat().st_size > MAX_PARTITION_BYTES:
        raise CircuitsError(f"{path} is over {MAX_PARTITION_BYTES} bytes; it is not a partition xcm export wrote")
    try:
        table = pq.read_table(path, columns=["group", "matrix", "side", "unit", "cluster"]).to_pydict()
    except Exception as error:  # pyarrow raises several types for a file that is not the expected Parquet
        raise CircuitsError(f"{path} is not a partition table ({type(error).__name__}: {error})") from None
    groups = {group.name: group for group in find_matrix_groups(model)}
    labels: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for group, matrix, side, unit, cluster in zip(*table.values(), strict=True):
        labels.setdefault((group, matrix, side), []).append((unit, cluster))
    partitions = {}
    for name in sorted({group for group, _, _ in labels}):
        if name not in groups:
            raise CircuitsError(f"{path} partitions a group {name!r} the model does not have; re-export the model")
        partitions[name] = _group_partition(path, groups[name], labels)
    return partitions


def _group_partition(path, group, labels) -> GroupPartition:
    from orchestrator.modularity import GroupPartition

    def column(matrix: str, side: str, size: int) -> torch.Tensor:
        rows = sorted(labels.get((group.name, matrix, side), []))
        values = torch.tensor([cluster for _, cluster in rows], dtype=torch.long)
        if [unit for unit, _ in rows] != list(range(size)) or (values < 0).any():
            raise CircuitsError(
                f"{path}: {group.name} {side} {matrix} does not label units 0..{size - 1} with "
                "clusters >= 0; re-export the model"
            )
        return values

    d_hidden = group.matrices[0].shape[0] if group.inputs else group.matrices[0].shape[1]
    hidden = column("", "hidden", d_hidden)
    inputs = tuple(column(m.name, "input", m.shape[1]) for m in group.inputs)
    outputs = tuple(column(m.name, "output", m.shape[0]) for m in group.outputs)
    k = int(torch.cat([hidden, *inputs, *outputs]).max()) + 1
    return GroupPartition(k, hidden, inputs, outputs)

"""The child process of ``orchestrator.train.model_logging``: loads the run's newest checkpoint and logs its model.

``python -m orchestrator.train.model_logging_process RUN_DIRECTORY RUN_ID``, with the store and the run's
experiment in ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_ID``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.train import checkpoint_store as store
from orchestrator.train.model_logging import MODEL_NAME, PARTITION_FILE, RESULT_PREFIX, TOO_LARGE_EXIT_CODE

if TYPE_CHECKING:
    import torch

    from orchestrator.spec import JobSpec

_TEXT_GENERATION = "text-generation"
_SHARD_BYTES = 2 << 30  # the largest safetensors file of a logged language model


def main(argv: list[str]) -> int:
    """``python -m orchestrator.train.model_logging RUN_DIRECTORY RUN_ID``: log the newest checkpoint's model into
    the run; answer in one line after ``RESULT_PREFIX``: JSON (the model's URI, its registered version) or, for a model
    over the size limit, the reason it was not logged."""
    import tempfile

    from orchestrator.train.export import checkpoint_spec, local_copy
    from orchestrator.train.resume import locate

    run_directory, run_id = argv
    located = locate(run_directory, os.environ["MLFLOW_TRACKING_URI"])
    with tempfile.TemporaryDirectory(prefix="xcm-model-") as scratch:
        checkpoint = local_copy(located, Path(scratch) / "checkpoint")
        spec = checkpoint_spec(checkpoint)
        skeleton = _skeleton(spec, checkpoint)
        size_gb = sum(parameter.numel() for parameter in skeleton.parameters()) * 4 / 1e9
        wanted = spec.tracking.log_model or spec.tracking.register_model
        if size_gb > spec.tracking.log_model_max_gb and not wanted:
            print(
                f"{RESULT_PREFIX}trained model not logged to MLflow: its fp32 weights ({size_gb:.1f} GB) exceed "
                f"tracking.log_model_max_gb ({spec.tracking.log_model_max_gb:g}); set tracking.log_model: true "
                "to log it, or export it with `xcm export`"
            )
            return TOO_LARGE_EXIT_CODE
        if (checkpoint / store.MODEL_CONFIG).is_file():
            info = _log_language_model(spec, checkpoint, located.state, run_id, Path(scratch))
        else:
            info = _log_classifier(spec, checkpoint, located.state, run_id, Path(scratch))
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "model_uri": info.model_uri,
                "registered_name": spec.tracking.register_model,
                "registered_version": info.registered_model_version,
            }
        )
    )
    return 0


def _skeleton(spec: JobSpec, checkpoint: Path) -> torch.nn.Module:
    """The model without its weights (on the meta device: no memory), to count its parameters."""
    import torch

    with torch.device("meta"):
        if (checkpoint / store.MODEL_CONFIG).is_file():
            import transformers

            return transformers.AutoModelForCausalLM.from_config(_transformers_config(checkpoint))
        return _classifier(spec)


def _transformers_config(checkpoint: Path):
    import transformers

    return transformers.AutoConfig.from_pretrained(checkpoint / Path(store.MODEL_CONFIG).parent)


def _log_language_model(spec: JobSpec, checkpoint: Path, state: store.CheckpointState, run_id: str, scratch: Path):
    import mlflow
    import transformers

    weights = scratch / "weights"
    _write_weights(checkpoint, state, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(weights).eval()
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": hf_tokenizer(spec)},
        name=MODEL_NAME,
        task=_TEXT_GENERATION,
        run_id=run_id,
        step=spec.training.steps - 1,
        registered_model_name=spec.tracking.register_model,
        pip_requirements=_requirements("torch", "transformers", "tokenizers", "safetensors"),
    )
    _log_partition(model, spec, checkpoint, info.model_id, scratch)
    return info


def _write_weights(checkpoint: Path, state: store.CheckpointState, directory: Path) -> None:
    """The consolidated fp32 weights as a transformers checkpoint: its config and safetensors shards of at most
    ``_SHARD_BYTES``, each copied out of DeepSpeed's flat buffer (whose views safetensors refuses) only while it is
    written, so the process holds the weights once plus one shard. A tied weight (the same tensor under two
    names) is written once; ``from_pretrained`` ties it again."""
    from safetensors.torch import save_file

    from orchestrator.train.export import consolidated_state_dict

    weights = consolidated_state_dict(checkpoint, state)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in weights.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > _SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    directory.mkdir()
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, names in zip(files, shards, strict=True):
        save_file({name: weights[name].clone() for name in names}, directory / file, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    del weights
    _transformers_config(checkpoint).save_pretrained(directory)


def _log_classifier(spec: JobSpec, checkpoint: Path, state: store.CheckpointState, run_id: str, scratch: Path):
    import mlflow

    from orchestrator.train.export import consolidated_state_dict

    model = _classifier(spec)
    model.load_state_dict(consolidated_state_dict(checkpoint, state), strict=True)
    model.eval()
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        run_id=run_id,
        step=spec.training.steps - 1,
        input_example=classifier_input_example(spec).numpy(),
        serialization_format="pt2",
        registered_model_name=spec.tracking.register_model,
        pip_requirements=_requirements("torch"),
    )
    _log_partition(model, spec, checkpoint, info.model_id, scratch)
    return info


def _classifier(spec: JobSpec) -> torch.nn.Module:
    from orchestrator.models import build_model

    vocabulary = spec.data.modulus + 1 if spec.model.family == "modular_addition" else None  # its "=" token
    return build_model(spec.model, vocabulary, seed=spec.training.seed)


def classifier_input_example(spec: JobSpec) -> torch.Tensor:
    """Two inputs of the classifier's shape (the batch dimension stays dynamic in the exported program): blank
    images, or the prompts ``0 1 =`` and ``2 3 =``."""
    import torch

    if spec.model.family == "modular_addition":
        equals = spec.data.modulus
        return torch.tensor([[0, 1, equals], [2, 3, equals]])
    from orchestrator.models.vision import input_shape

    return torch.zeros(2, *input_shape(spec.model.family))


def hf_tokenizer(spec: JobSpec):
    """The job's tokenizer as ``transformers`` saves and loads it: a pretrained one as it is; xcm's byte
    vocabulary as a byte-level BPE without merges, so each byte is its own token with the same id (0-255, then
    pad, bos and eos)."""
    import transformers

    from orchestrator.data.tokenizer import BYTE_TOKENIZER, ByteTokenizer, tokenizer_name

    name = tokenizer_name(spec.data, spec.model)
    if name != BYTE_TOKENIZER:
        return transformers.AutoTokenizer.from_pretrained(name)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = {"<pad>": ByteTokenizer.pad_id, "<s>": ByteTokenizer.bos_id, "</s>": ByteTokenizer.eos_id}
    vocabulary = {character: byte for byte, character in bytes_to_unicode().items()} | specials
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _log_partition(model, spec: JobSpec, checkpoint: Path, model_id: str, scratch: Path) -> None:
    """The partition the model was trained under (one row per unit), in the logged model's artifacts."""
    import mlflow
    import pyarrow.parquet as pq

    from orchestrator.modularity import GroupPartition, find_matrix_groups
    from orchestrator.partitioning.table import partition_table

    saved = json.loads((checkpoint / store.PARTITION).read_text())
    if saved is None:
        return
    partitions = {name: GroupPartition.from_dict(data) for name, data in saved["partitions"].items()}
    path = scratch / PARTITION_FILE
    pq.write_table(partition_table(find_matrix_groups(model, spec.modularity.matrices), partitions), path)
    mlflow.MlflowClient().log_model_artifact(model_id, str(path))


def _requirements(*packages: str) -> list[str]:
    """Pinned to the versions that wrote the model (a local build's ``+cpu`` suffix dropped)."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in packages]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))

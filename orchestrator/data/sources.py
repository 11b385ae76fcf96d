"""One entry point from the job's data section to ready-to-train blocks: a builder per source.

A source names a builder in ``BUILDERS``; a new kind of data (images, modular addition) plugs in by adding
one entry. The driver calls ``build_training_data`` once before Ray starts (so bad input fails early and the
token cache is warm), then every worker calls it again and reads the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from orchestrator.data.corpus import build_synthetic_blocks, build_validation_blocks, task_blocks
from orchestrator.data.examples import ExampleData
from orchestrator.data.modular_addition import build_modular_addition_data
from orchestrator.data.synthetic import TASKS
from orchestrator.data.tokenizer import load_tokenizer
from orchestrator.data.training_data import DataError, TrainingData

if TYPE_CHECKING:
    from orchestrator.spec import DataSpec, ModelSpec

# Text sources build token blocks; classification sources (images, modular addition) labelled examples.
Builder = Callable[["DataSpec", "ModelSpec"], "TrainingData | ExampleData"]


def build_synthetic_data(data: DataSpec, model: ModelSpec) -> TrainingData:
    """xcm's multi-task corpus: training blocks, held-out validation blocks, and validation blocks per task."""
    tokenizer = load_tokenizer(data, model)
    arguments = {"block_size": data.block_size, "seed": data.seed, "tasks": data.tasks, "tokenizer": tokenizer}
    with _too_few_examples("data.num_examples"):
        train, _ = build_synthetic_blocks(data.num_examples, **arguments)
    validation, by_task = None, {}
    if data.validation_examples:
        per_task = data.validation_examples // len(data.tasks or TASKS)
        with _too_few_examples("data.validation_examples"):
            validation, _ = build_validation_blocks(data.validation_examples, **arguments)
            by_task = task_blocks(per_task, **arguments) if per_task else {}
    return TrainingData(train=train, validation=validation, tokenizer=tokenizer, validation_by_task=by_task)


@contextmanager
def _too_few_examples(key: str) -> Iterator[None]:
    """Packing raises ValueError when the examples do not fill one block: report it against ``key``."""
    try:
        yield
    except ValueError as error:
        raise DataError(key, str(error), f"raise {key} or lower data.block_size") from error


def _text_data(data: DataSpec, model: ModelSpec) -> TrainingData:
    from orchestrator.data.text_sources import build_text_data  # imports datasets only for text sources

    return build_text_data(data, model)


def _image_data(data: DataSpec, model: ModelSpec) -> ExampleData:
    from orchestrator.data.images import build_image_data  # scikit-learn and datasets, only for image sources

    return build_image_data(data, model)


BUILDERS: dict[str, Builder] = {
    "synthetic": build_synthetic_data,
    "hub": _text_data,
    "files": _text_data,
    "digits": _image_data,
    "mnist": _image_data,
    "cifar10": _image_data,
    "modular_addition": build_modular_addition_data,
}


def build_training_data(data: DataSpec, model: ModelSpec) -> TrainingData:
    """The blocks the job's data section describes, built by its source's builder."""
    return BUILDERS[data.source](data, model)

"""Bad data input found before any worker starts: spec-level checks, then one build of the data on the driver.

``data_spec_problems`` runs with every spec load (``xcm check`` too) and only reads the spec. ``check_data``
runs on the driver before Ray starts: it looks for the files, loads the tokenizer, then builds the data once,
which reaches the dataset (hub or files) and fills the token cache that the workers then read.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.data.training_data import DataError, TrainingData

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec, SpecProblem

# The sources that read each source-specific key: set under another source it would be silently ignored.
_READERS_OF_KEY = {
    "dataset": ("hub", "mnist", "cifar10"),  # image sources: a hub name or a local directory
    "dataset_config": ("hub",),
    "files": ("files",),
    "validation_files": ("files",),
    "format": ("files",),
    "tasks": ("synthetic",),
}
_IMAGE_HUB_SOURCES = ("mnist", "cifar10")  # a validation split of their own, or a held-out share when it is null


def data_spec_problems(spec: JobSpec) -> list[SpecProblem]:
    """Problems visible in the spec alone: a source without its inputs, keys its source ignores, no validation."""
    from orchestrator.spec import SpecProblem

    data, problems = spec.data, []
    if data.source == "hub" and not data.dataset:
        problems.append(
            SpecProblem(
                key="data.dataset",
                message="source is 'hub' but no dataset is named",
                fix="set data.dataset (e.g. wikitext) and data.dataset_config",
            )
        )
    if data.source == "files" and not data.files:
        problems.append(
            SpecProblem(
                key="data.files",
                message="source is 'files' but no files are listed",
                fix="list text, JSONL or Parquet files (or glob patterns) in data.files",
            )
        )
    for key, readers in _READERS_OF_KEY.items():
        if data.source not in readers and getattr(data, key):
            problems.append(
                SpecProblem(
                    key=f"data.{key}",
                    message=f"only read for source: {' or '.join(readers)}, but source is {data.source!r}",
                    fix=f"set data.source: {readers[0]}, or remove data.{key}",
                )
            )
    if spec.evaluation.every_steps and not _has_validation(spec):
        problems.append(
            SpecProblem(
                key="evaluation.every_steps",
                message="evaluation is on but the data holds nothing out for validation",
                fix=_validation_fix(spec) + ", or set evaluation.every_steps: 0",
            )
        )
    return problems


def check_data(spec: JobSpec) -> TrainingData:
    """Build the job's data once on the driver; raise SpecError listing every problem found, each with its fix."""
    from orchestrator.spec import SpecError, SpecProblem

    problems = [*missing_file_problems(spec), *_tokenizer_problems(spec)]
    data = None
    if not problems:
        from orchestrator.data.sources import build_training_data

        try:
            data = build_training_data(spec.data, spec.model)
        except DataError as error:
            problems.append(SpecProblem(key=error.key, message=error.message, fix=error.fix))
    if data is not None:
        problems += _validation_size_problems(spec, data)
    if problems:
        raise SpecError(f"job {spec.name!r} (data check before training)", problems)
    return data


def _has_validation(spec: JobSpec) -> bool:
    from orchestrator.data.text_sources import separate_validation

    data = spec.data
    if data.source == "synthetic":
        return data.validation_examples > 0
    if data.source in ("hub", "files"):
        return separate_validation(data) or data.validation_fraction > 0
    if data.source in _IMAGE_HUB_SOURCES:
        return bool(data.validation_split) or data.validation_fraction > 0
    return data.validation_fraction > 0  # digits and modular addition hold out a share of their examples


def _validation_fix(spec: JobSpec) -> str:
    image_split = (
        "set data.validation_split to a split of the dataset (e.g. test), or data.validation_split: null "
        "with data.validation_fraction > 0"
    )
    return {
        "synthetic": "set data.validation_examples > 0",
        "hub": "set data.validation_split to a split of the dataset, or data.validation_fraction > 0",
        "files": "list data.validation_files, or set data.validation_fraction > 0",
        "mnist": image_split,
        "cifar10": image_split,
    }.get(spec.data.source, "set data.validation_fraction > 0 (the share of examples held out)")


def missing_file_problems(spec: JobSpec) -> list[SpecProblem]:
    """The data files (and glob patterns) of a resolved spec that match nothing: `xcm check` reports them as
    `xcm run` does."""
    from orchestrator.data.text_sources import missing_patterns
    from orchestrator.spec import SpecProblem

    data = spec.data
    if data.source != "files":
        return []
    problems = []
    for key in ("files", "validation_files"):
        try:
            missing = missing_patterns(getattr(data, key), f"data.{key}")
        except DataError as error:
            problems.append(SpecProblem(key=error.key, message=error.message, fix=error.fix))
            continue
        problems += [
            SpecProblem(
                key=f"data.{key}",
                message=f"no file matches {pattern}",
                fix=f"correct the path (relative paths start at the directory xcm runs in, {os.getcwd()})",
            )
            for pattern in missing
        ]
    return problems


def _tokenizer_problems(spec: JobSpec) -> list[SpecProblem]:
    """The tokenizer must load and its ids must fit the model's embedding."""
    from orchestrator.data.tokenizer import load_tokenizer, tokenizer_name
    from orchestrator.models.registry import model_config
    from orchestrator.spec import SpecProblem

    name = tokenizer_name(spec.data, spec.model)
    try:
        tokenizer = load_tokenizer(spec.data, spec.model)
    except (OSError, ValueError) as error:  # transformers raises OSError for a missing or unreachable tokenizer
        return [
            SpecProblem(
                key="data.tokenizer",
                message=f"tokenizer {name!r} cannot be loaded ({error})",
                fix="name a local tokenizer directory or a hub tokenizer that is cached here (offline, "
                "the hub is unreachable), or data.tokenizer: byte",
            )
        ]
    try:
        model_vocabulary = model_config(spec.model, vocab_size=tokenizer.vocab_size).vocab_size
    except (OSError, ValueError):
        return []  # the model itself cannot be configured: the model checks report that
    if model_vocabulary >= tokenizer.vocab_size:
        return []
    return [
        SpecProblem(
            key="data.tokenizer",
            message=f"tokenizer {name!r} has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
            f"{model_vocabulary}, so some token ids would have no embedding",
            fix=f"use the model's own tokenizer (omit data.tokenizer), or raise model.config.vocab_size to >= "
            f"{tokenizer.vocab_size}",
        )
    ]


def _validation_size_problems(spec: JobSpec, data: TrainingData) -> list[SpecProblem]:
    """Every rank evaluates an equal share of each validation set, so each set needs an item per worker."""
    from orchestrator import metric_names
    from orchestrator.data.training_data import evaluation_sets
    from orchestrator.spec import SpecProblem

    if not spec.evaluation.every_steps:
        return []
    workers = spec.resources.max_workers
    sizes = {name: len(items) for name, items in evaluation_sets(data, spec.evaluation.per_task).items()}
    unit, fix = _validation_size_unit_and_fix(spec)
    return [
        SpecProblem(
            key="evaluation.every_steps",
            message=f"the validation set for {name} holds {size} {unit}, fewer than the {workers} workers that "
            "evaluate a share each",
            fix=fix + ", or set evaluation.every_steps: 0",
        )
        for name, size in (sizes or {metric_names.EVAL_LOSS: 0}).items()
        if size < workers
    ]


def _validation_size_unit_and_fix(spec: JobSpec) -> tuple[str, str]:
    """What a validation set counts (token blocks or examples), and how to hold out more of them."""
    from orchestrator.spec import TEXT_SOURCES

    data, workers = spec.data, spec.resources.max_workers
    if data.source in TEXT_SOURCES:
        return (
            f"blocks of {data.block_size + 1} tokens",
            _validation_fix(spec) + " (more validation text), lower data.block_size",
        )
    if data.source in _IMAGE_HUB_SOURCES and data.validation_split:
        return "examples", f"name a data.validation_split with at least {workers} examples"
    return "examples", f"raise data.validation_fraction until at least {workers} examples are held out"

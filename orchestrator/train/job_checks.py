"""Loading a job: the schema (``orchestrator.spec``), then every component's checks of its own section, then the
checks between sections.

Each component owns its section's checks: the data's in ``orchestrator.data.preflight``, training's in
``orchestrator.train.preflight``, the model's in ``orchestrator.models.checks``, each side job's in its kind
(``SideJobKind.spec_problems``). What only two sections together decide (k against the model's widths, a text
block against its positions, the circuits' tasks against the model and its data) is checked here, beside
``load_spec``; the schema module imports none of them.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.data.preflight import data_spec_problems, missing_file_problems
from orchestrator.models.checks import model_spec_problems
from orchestrator.models.dimensions import ModelDimensions
from orchestrator.models.registry import model_dimensions
from orchestrator.spec import (
    DEFAULT_JOB,
    TEXT_SOURCES,
    JobSpec,
    SpecError,
    SpecProblem,
    param_name_problems,
    validate_job,
    worker_range_problems,
)
from orchestrator.train.preflight import training_spec_problems
from orchestrator.train.side_job_registry import SIDE_JOBS


def load_spec(path: str | Path | None = None, overrides: list[str] = (), files_from: Path | None = None) -> JobSpec:
    """Read, override (``section.key=value``) and validate a job file; raise SpecError listing every problem.

    ``files_from``: also require the job's data files to exist, relative to that directory, as ``xcm run``
    does before it starts (``xcm check`` passes it too, so both report a missing file alike)."""
    path = Path(path) if path is not None else DEFAULT_JOB
    spec, problems, lines = validate_job(path, list(overrides))
    if spec is not None:
        found = consistency_problems(spec) + circuit_task_problems(spec, files_from)
        if files_from is not None:
            found += missing_file_problems(spec.resolved(files_from))
        problems += [p.model_copy(update={"line": lines.get(p.key)}) for p in found]
    if problems:
        raise SpecError(str(path), problems)
    return spec


def consistency_problems(spec: JobSpec) -> list[SpecProblem]:
    """Problems between keys that each look valid alone (pydantic checks the keys one at a time)."""
    problems = model_spec_problems(spec.model)
    problems += param_name_problems(spec)
    problems += worker_range_problems(spec)
    problems += data_spec_problems(spec)
    problems += training_spec_problems(spec)
    dimensions = _dimensions(spec, problems)
    for kind in SIDE_JOBS:
        problems += kind.spec_problems(spec, dimensions)
    if dimensions is not None:
        problems += _model_size_problems(spec, dimensions)
    return problems


def circuit_task_problems(spec: JobSpec, files_from: Path | None) -> list[SpecProblem]:
    """The circuits section's tasks against the model and its data (and the task files, from `files_from`,
    where the circuits actor reads them), so that a task it cannot build stops the job before it starts."""
    from orchestrator.circuit_report import task_problems
    from orchestrator.spec import CIRCUIT_TASK_FORMS

    return [
        SpecProblem(
            key="circuits.tasks",
            message=message,
            fix=f"list tasks this model and its data have, in the forms {CIRCUIT_TASK_FORMS}",
        )
        for message in task_problems(spec, files_from)
    ]


def _dimensions(spec: JobSpec, problems: list[SpecProblem]) -> ModelDimensions | None:
    """The model's sizes, when the spec alone tells them (None otherwise; a config that cannot give them is a
    problem added to `problems`)."""
    model = spec.model
    if any(problem.key.startswith("model.config.") for problem in problems):
        return None  # the model cannot be configured to read its sizes
    if model.init == "pretrained" and not (model.pretrained and Path(model.pretrained).is_dir()):
        return None  # a hub model's sizes are known only once it is fetched, at build time
    try:
        return model_dimensions(model)
    except OSError:
        return None  # an unreadable pretrained directory: training_spec_problems reported it
    except ValueError as error:
        problems.append(
            SpecProblem(
                key="model.config", message=str(error), fix="use config keys of the family's transformers config class"
            )
        )
        return None


def _model_size_problems(spec: JobSpec, dimensions: ModelDimensions) -> list[SpecProblem]:
    """k fits the smallest regularised width; a text block fits the model's positions."""
    problems = []
    smallest, k = min(dimensions.hidden, dimensions.intermediate), spec.modularity.k
    if k > smallest:
        problems.append(
            SpecProblem(
                key="modularity.k",
                message=f"k={k} exceeds the smallest regularised dimension ({smallest})",
                fix=f"choose k <= {smallest}",
            )
        )
    if spec.data.source in TEXT_SOURCES and spec.data.block_size > dimensions.max_positions:
        problems.append(
            SpecProblem(
                key="data.block_size",
                message=f"{spec.data.block_size} tokens exceed the model's {dimensions.max_positions} positions",
                fix=f"set data.block_size <= {dimensions.max_positions} or raise the model's position limit",
            )
        )
    return problems

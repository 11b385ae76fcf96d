"""An experiment: one checked job spec per (variant, seed), and which variant is each one's control.

An experiment file (``jobs/experiments/*.yaml``) names a base job (a file, or a ``job:`` mapping), overrides
for every trial, named variants (each a mapping of dotted job keys to values; one of them, ``control``, trains
with λ = 0) and the seeds. ``xcm sweep`` builds the same plan from a grid. The file is hostile input held to a
job file's bounds (size, nesting, aliases, duplicate keys: ``spec.read_job``), and every trial's job is
checked before any trial starts, all problems at once.

A seed sets ``training.seed`` (initialisation and data order) and ``modularity.seed`` (the co-clustering);
``data.seed`` stays the base job's, so every trial is evaluated on the same held-out examples.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.spec import JobSpec, SpecError, SpecProblem, read_job
from orchestrator.train.job_checks import load_spec

CONTROL = "control"
LAMBDA_KEY = "modularity.lambda"
SEED_KEYS = ("training.seed", "modularity.seed")
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_SEEDS = 100
MAX_TRIALS = 1000  # a grid of 10 values on 3 keys with 3 seeds is 3000 runs: more than anyone means to start


class ExperimentFile(BaseModel):
    """The experiment file's schema; unknown keys are errors, as in a job file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, pattern=NAME_PATTERN, description="the parent run's name (default: file stem)")
    base: str | None = Field(None, description="the base job file, relative to the experiment file")
    job: dict[str, Any] | None = Field(None, description="the base job written inline, instead of base")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted job keys set for every trial")
    variants: dict[str, dict[str, Any]] = Field(min_length=1, max_length=MAX_TRIALS)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=MAX_SEEDS)
    metrics: list[str] | None = Field(
        None, min_length=1, max_length=200, description="final metrics to compare (default: the usual ones present)"
    )
    max_failures: int = Field(1, ge=-1, le=100, description="Ray Tune's retries of a failed trial (-1: no limit)")

    @field_validator("variants")
    @classmethod
    def _named_variants(cls, variants: dict) -> dict:
        bad = [name for name in variants if not re.fullmatch(NAME_PATTERN, str(name))]
        if bad:
            raise ValueError(f"variant names take letters, digits, _ . - (at most 64): {bad[0]!r}")
        if CONTROL not in variants:
            raise ValueError(f"no variant named '{CONTROL}' (the same job with {LAMBDA_KEY}: 0)")
        return variants

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds must be distinct and not negative")
        return seeds


@dataclass(frozen=True)
class Trial:
    """One (variant, seed): the job it trains."""

    variant: str
    seed: int
    spec: JobSpec

    @property
    def key(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass(frozen=True)
class ExperimentPlan:
    name: str
    controls: dict[str, str | None]  # variant -> the variant it is compared with (None: the control, or none)
    seeds: tuple[int, ...]
    trials: tuple[Trial, ...]
    metrics: tuple[str, ...] | None
    max_failures: int
    params: dict[str, str]  # what the parent run records
    source: str  # the experiment file's text (or the sweep's command), logged beside the report

    @property
    def variants(self) -> list[str]:
        return list(self.controls)


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentPlan:
    """Read and check an experiment file: every trial's job loads, the control trains with λ = 0. SpecError
    lists every problem at once."""
    path = Path(path)
    raw, lines = read_job(path)
    try:
        experiment = ExperimentFile.model_validate(raw)
    except ValidationError as error:
        raise SpecError(str(path), [_problem(item, lines) for item in error.errors()]) from None
    base_overrides = [*_override_strings(experiment.overrides), *overrides]
    variants = {name: _override_strings(values) for name, values in experiment.variants.items()}
    with _base_job(path, experiment, lines) as base:
        trials, problems = _trials(base, base_overrides, variants, experiment.seeds)
    control = next((t.spec for t in trials if t.variant == CONTROL), None)
    if control is not None and control.modularity.lambda_ != 0:
        problems.append(
            SpecProblem(
                key=f"variants.{CONTROL}",
                message=f"the control trains with λ = {control.modularity.lambda_}",
                fix=f"set {LAMBDA_KEY}: 0 in it",
                line=lines.get(f"variants.{CONTROL}"),
            )
        )
    if problems:
        raise SpecError(str(path), problems)
    controls = {name: None if name == CONTROL else CONTROL for name in variants}
    params = {
        "experiment.file": str(path),
        "experiment.seeds": str(experiment.seeds),
        "experiment.base": experiment.base or "(inline)",
        **{f"experiment.overrides.{key}": str(value) for key, value in experiment.overrides.items()},
        **{
            f"experiment.variants.{name}.{key}": str(value)
            for name, values in experiment.variants.items()
            for key, value in values.items()
        },
    }
    return ExperimentPlan(
        name=experiment.name or _safe_name(path.stem),
        controls=controls,
        seeds=tuple(experiment.seeds),
        trials=tuple(trials),
        metrics=tuple(experiment.metrics) if experiment.metrics else None,
        max_failures=experiment.max_failures,
        params=params,
        source=path.read_text(encoding="utf-8"),
    )


def build_sweep(
    job: str | Path, grid: list[str], seeds: int, overrides: list[str] = (), max_failures: int = 1
) -> ExperimentPlan:
    """The plan of ``xcm sweep``: every point of the grid (``key=v1,v2`` per key) × seeds 0..seeds-1. A point's
    control is the point with the same values but ``modularity.lambda=0``, when the grid has it."""
    axes = [_grid_axis(entry) for entry in grid]
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise SpecError(
            "--grid",
            [
                SpecProblem(
                    key="--grid", message="a key is given twice", fix="give each key once, its values comma-separated"
                )
            ],
        )
    if not 1 <= seeds <= MAX_SEEDS:
        raise SpecError(
            "--seeds", [SpecProblem(key="--seeds", message=f"{seeds} seeds", fix=f"choose 1 to {MAX_SEEDS}")]
        )
    points = list(itertools.product(*[values for _, values in axes]))
    if len(points) * seeds > MAX_TRIALS:
        raise SpecError(
            "--grid",
            [
                SpecProblem(
                    key="--grid",
                    message=f"{len(points) * seeds} trials",
                    fix=f"keep the grid × seeds at {MAX_TRIALS} trials or fewer",
                )
            ],
        )
    names = _point_names(keys, points)
    variants = {
        name: [f"{key}={value}" for key, value in zip(keys, point, strict=True)]
        for name, point in zip(names, points, strict=True)
    }
    trials, problems = _trials(Path(job), list(overrides), variants, list(range(seeds)))
    if problems:
        raise SpecError(str(job), problems)
    controls = _grid_controls(keys, points, names)
    source = "xcm sweep " + " ".join(
        [str(job), *(f"--grid {g}" for g in grid), f"--seeds {seeds}", *(f"--set {o}" for o in overrides)]
    )
    params = {
        "experiment.file": "(sweep)",
        "experiment.base": str(job),
        "experiment.seeds": str(list(range(seeds))),
        **{f"experiment.grid.{key}": ",".join(values) for key, values in axes},
        **{f"experiment.overrides.{o.partition('=')[0]}": o.partition("=")[2] for o in overrides},
    }
    return ExperimentPlan(
        name=f"{_safe_name(Path(job).stem)}-sweep",
        controls=controls,
        seeds=tuple(range(seeds)),
        trials=tuple(trials),
        metrics=None,
        max_failures=max_failures,
        params=params,
        source=source,
    )


def _trials(
    base: Path, base_overrides: list[str], variants: dict[str, list[str]], seeds: list[int]
) -> tuple[list[Trial], list[SpecProblem]]:
    """Each variant's job checked once (its data files too, as ``xcm run`` does); the seeds then only change
    integers that need no check."""
    trials, problems = [], []
    for name, variant_overrides in variants.items():
        try:
            spec = load_spec(base, [*base_overrides, *variant_overrides], files_from=Path.cwd())
        except SpecError as error:
            problems += [
                p.model_copy(update={"key": f"variants.{name}: {p.key}", "line": None}) for p in error.problems
            ]
            continue
        trials.extend(Trial(name, seed, _seeded(spec, name, seed)) for seed in seeds)
    stores = {(t.spec.tracking.uri, t.spec.tracking.experiment) for t in trials}
    if len(stores) > 1:
        problems.append(
            SpecProblem(
                key="variants",
                message="the variants log to different MLflow stores or "
                "experiments (tracking.uri, tracking.experiment)",
                fix="set tracking keys in the base job or overrides, not in a variant: the "
                "comparison reads every trial from the parent run's experiment",
            )
        )
    if not problems and len(trials) > MAX_TRIALS:
        problems.append(
            SpecProblem(
                key="variants",
                message=f"{len(trials)} trials (variants × seeds)",
                fix=f"keep them at {MAX_TRIALS} or fewer",
            )
        )
    return trials, problems


def _seeded(spec: JobSpec, variant: str, seed: int) -> JobSpec:
    return spec.model_copy(
        update={
            "name": f"{spec.name}-{variant}-s{seed}"[:200],
            "training": spec.training.model_copy(update={"seed": seed}),
            "modularity": spec.modularity.model_copy(update={"seed": seed}),
        }
    )


@contextlib.contextmanager
def _base_job(path: Path, experiment: ExperimentFile, lines: dict[str, int]):
    """The base job as a file: the experiment's ``base`` (which must stay inside the directory above the
    experiment file, e.g. ``jobs/`` for ``jobs/experiments/x.yaml``), or its inline ``job`` written out."""
    if (experiment.base is None) == (experiment.job is None):
        raise SpecError(
            str(path),
            [
                SpecProblem(
                    key="base",
                    message="give either base (a job file) or job (the job inline), not both or neither",
                    fix="write base: ../tiny.yaml, or job: {name: ..., model: ...}",
                    line=lines.get("base"),
                )
            ],
        )
    if experiment.job is None:
        yield _contained_base(path, experiment.base, lines.get("base"))
        return
    with tempfile.TemporaryDirectory(prefix="xcm-experiment-") as directory:
        job = Path(directory) / f"{path.stem}.job.yaml"
        job.write_text(yaml.safe_dump(experiment.job, sort_keys=False), encoding="utf-8")
        yield job


def _contained_base(path: Path, base: str, line: int | None) -> Path:
    allowed = path.resolve().parent.parent
    target = (path.resolve().parent / base).resolve()
    if Path(base).is_absolute() or not target.is_relative_to(allowed):
        raise SpecError(
            str(path),
            [
                SpecProblem(
                    key="base",
                    message=f"{base!r} lies outside {allowed}",
                    fix="name a job file beside the experiment file or in the directory above it",
                    line=line,
                )
            ],
        )
    return target


def _override_strings(values: dict[str, Any]) -> list[str]:
    """``{key: value}`` as ``--set`` strings; the value as YAML, which the job loader parses within its bounds."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True)}" for key, value in values.items()]


def _grid_axis(entry: str) -> tuple[str, list[str]]:
    key, sep, values = entry.partition("=")
    items = [value.strip() for value in values.split(",")] if sep else []
    if not key or not items or any(not item for item in items) or len(items) > 100:
        raise SpecError(
            "--grid",
            [
                SpecProblem(
                    key=entry[:120],
                    message="a grid axis must read key=v1,v2,...",
                    fix="write e.g. --grid modularity.lambda=0,5,20",
                )
            ],
        )
    return key.strip(), items


def _point_names(keys: list[str], points: list[tuple[str, ...]]) -> list[str]:
    """``lambda20_k4`` for (modularity.lambda=20, modularity.k=4): each key's last part and its value."""
    names: list[str] = []
    for point in points:
        name = (
            "_".join(
                f"{key.rsplit('.', 1)[-1]}{re.sub(r'[^A-Za-z0-9.-]', '', value)}"
                for key, value in zip(keys, point, strict=True)
            )[:60]
            or "point"
        )
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def _grid_controls(keys: list[str], points: list[tuple[str, ...]], names: list[str]) -> dict[str, str | None]:
    if LAMBDA_KEY not in keys:
        return dict.fromkeys(names)
    position = keys.index(LAMBDA_KEY)

    def rest(point: tuple[str, ...]) -> tuple[str, ...]:
        return point[:position] + point[position + 1 :]

    zero = {rest(point): name for point, name in zip(points, names, strict=True) if _is_zero(point[position])}
    return {
        name: None if _is_zero(point[position]) else zero.get(rest(point))
        for point, name in zip(points, names, strict=True)
    }


def _is_zero(value: str) -> bool:
    try:
        return float(yaml.safe_load(value)) == 0
    except (TypeError, ValueError, yaml.YAMLError):
        return False


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:64] or "experiment"


def _problem(item: dict, lines: dict[str, int]) -> SpecProblem:
    key = ".".join(str(part) for part in item["loc"]) or "(file)"
    if item["type"] == "extra_forbidden":
        message, fix = (
            "unknown key",
            ("an experiment file takes name, base or job, overrides, variants, seeds, metrics, max_failures"),
        )
    elif item["type"] == "missing":
        message, fix = "required key is missing", "add it (see jobs/experiments/)"
    else:
        message, fix = item["msg"][0].lower() + item["msg"][1:], "see jobs/experiments/ for a valid value"
    return SpecProblem(key=key, message=message, fix=fix, line=lines.get(key))

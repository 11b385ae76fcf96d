"""The typed job spec: the single source of configuration for an xcm run.

A job file (``jobs/*.yaml``) is a serialised :class:`JobSpec`. Loading it checks every key at once and
raises :class:`SpecError` listing all problems, each with the file, line, key and a fix, before anything
starts. Components receive the section they need (``spec.training``, ``spec.modularity``...), never a dict.

A job file is hostile input (it may come from a checkpoint or a colleague): its size, nesting depth and the
number of values its YAML aliases expand to are bounded before anything is built from it, and duplicate keys,
bytes that are not UTF-8, an empty file and non-finite numbers are errors rather than silent guesses.
"""

from __future__ import annotations

import math
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from orchestrator.spec_problems import SHOWN_CHARACTERS, SpecError, SpecProblem

DEFAULT_JOB = Path("jobs/tiny.yaml")
RUNS_DIRECTORY = "xcm-runs"
TEXT_SOURCES = ("synthetic", "hub", "files")  # the others are classification data: images, modular addition
# Bounds on a job file (and on a --set value). The shipped jobs are under 2 KB, nest 4 deep and hold ~100 values:
# the bounds leave room for long file lists while a 1 KB alias bomb (10^9 values once expanded) stops at once.
MAX_JOB_BYTES = 1 << 20
MAX_NESTING = 32
MAX_VALUES = 100_000
INVALID_JOB_EXIT_CODE = 2  # `xcm run`, `check`, `submit` and `resume` exit with it for a job that does not load
# MLflow's rule for param names (each key of the spec becomes one): these characters, at most 250 of them.
_MLFLOW_PARAM_NAME = re.compile(r"[/\w.\- :]{1,250}")


class Section(BaseModel):
    """A spec section: unknown keys are errors (a typo must never be silently ignored), and so are inf and nan
    (an infinite lr or lambda would train nothing but NaNs)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, allow_inf_nan=False)


class ModelSpec(Section):
    family: Literal["gpt2", "gpt_neox", "gemma", "mnist_mlp", "cifar_cnn", "modular_addition"] = Field(
        "gpt2",
        description="model family: gpt2, gpt_neox (Pythia) or gemma; or one of xcm's own classifiers: "
        "mnist_mlp, cifar_cnn, modular_addition (random init, sizes as in the papers)",
    )
    size: Literal["tiny", "small"] = Field(
        "tiny", description="preset: tiny = 2 layers of width 64; small = the family's smallest real size"
    )
    init: Literal["random", "pretrained"] = "random"
    pretrained: str | None = Field(None, description="local path or hub name, for init: pretrained")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the preset's config")


class DataSpec(Section):
    source: Literal["synthetic", "hub", "files", "digits", "mnist", "cifar10", "modular_addition"] = Field(
        "synthetic",
        description="synthetic = xcm's built-in multi-task corpus (offline); hub = a Hugging Face "
        "dataset (data.dataset); files = local text, JSONL or Parquet files (data.files); "
        "images: digits (scikit-learn's, offline), mnist or cifar10 (hub, or data.dataset "
        "as a local directory); modular_addition = (a + b) mod data.modulus, generated",
    )
    tasks: list[str] | None = Field(None, description="synthetic tasks to include; all when omitted")
    num_examples: int = Field(20000, gt=0)
    validation_examples: int = Field(1000, ge=0)
    block_size: int = Field(64, gt=1, description="tokens per training sequence")
    seed: int = 0
    dataset: str | None = Field(None, description="hub dataset name, e.g. wikitext (source: hub)")
    dataset_config: str | None = Field(None, description="hub dataset config, e.g. wikitext-2-raw-v1")
    split: str = Field("train", description="hub split to train on")
    validation_split: str | None = Field(
        "validation", description="hub split to evaluate on; null holds out validation_fraction of training"
    )
    files: list[str] = Field(default_factory=list, description="local files or glob patterns (source: files)")
    validation_files: list[str] = Field(
        default_factory=list, description="local validation files; when empty, validation_fraction is held out"
    )
    format: Literal["text", "json", "parquet"] | None = Field(
        None, description="text, json (JSONL too) or parquet; from the files' suffixes when omitted"
    )
    text_field: str = Field("text", description="the column of JSONL/Parquet rows (or hub examples) with the text")
    validation_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of documents held out for validation when no split or files name one"
    )
    tokenizer: str | None = Field(
        None,
        description="byte, or a local path or hub name for AutoTokenizer; the pretrained model's own "
        "tokenizer (or byte for a random model) when omitted",
    )
    cache_dir: str | None = Field(None, description="token cache (Arrow); xcm-runs/data-cache when omitted")
    modulus: int = Field(113, ge=2, description="p of (a + b) mod p (source: modular_addition)")

    def resolved(self, workdir: Path, runs: Path) -> DataSpec:
        """Absolute file paths and cache directory, so every worker reads the same files wherever it runs."""

        def absolute(path: str) -> str:
            return str((workdir / Path(path).expanduser()).resolve())

        tokenizer = self.tokenizer
        if tokenizer and (workdir / tokenizer).is_dir():  # a local tokenizer; otherwise a hub name or "byte"
            tokenizer = absolute(tokenizer)
        return self.model_copy(
            update={
                "files": [absolute(path) for path in self.files],
                "validation_files": [absolute(path) for path in self.validation_files],
                "tokenizer": tokenizer,
                "cache_dir": absolute(self.cache_dir) if self.cache_dir else str(runs / "data-cache"),
            }
        )


class EvaluationSpec(Section):
    every_steps: int = Field(
        0, ge=0, description="steps between evaluations on the validation split (and after the last); 0 = off"
    )
    max_batches: int | None = Field(
        None, gt=0, description="micro-batches per worker per evaluation; the whole validation split when omitted"
    )
    per_task: bool = Field(True, description="also log eval/loss/<task> for the synthetic corpus's tasks")


Beta = Annotated[float, Field(ge=0, lt=1)]  # AdamW divides by 1 - beta**t: beta 1 divides by zero


class TrainingSpec(Section):
    steps: int = Field(50, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="sequences per worker per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 turns it off")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32; bf16 (CPU, or GPUs that support it); fp16 with dynamic loss scaling (GPUs, or "
        "CPUs with native fp16)",
    )
    initial_loss_scale_power: int = Field(
        16,
        ge=0,
        le=64,
        description="fp16: dynamic loss scaling starts at 2**power; a step whose gradients overflow "
        "is skipped and halves the scale (hysteresis spares the first), 1000 clean "
        "steps double it",
    )
    seed: int = 0
    report_every: int = Field(
        25,
        gt=0,
        description="steps between Ray Train reports (a report waits only when the "
        "previous one is still queued: reports under ~0.5 s apart cost "
        "~1-2 s each, wider ones nothing measurable)",
    )
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW's (beta1, beta2), each in [0, 1)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from lr/warmup_steps to lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine schedule's final lr, as a share of lr")
    activation_checkpointing: bool = Field(
        False, description="recompute transformer blocks in backward (non-reentrant): less memory, ~1/3 more compute"
    )
    compile: bool = Field(
        False,
        description="compile the model with torch.compile (DeepSpeed's engine.compile, inductor), the clusterability "
        "loss included; ZeRO 0-2 (ZeRO-3 is refused); the first steps pay the compile",
    )


class DeepSpeedSpec(Section):
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage, 0-3")
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (ZeRO 1-3)")
    param_persistence_threshold: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: parameters under this many elements stay whole on every rank "
        "(DeepSpeed's default 100000); 0 shards every parameter",
    )


class ModularitySpec(Section):
    k: int = Field(4, ge=2, description="clusters per matrix")
    lambda_: float = Field(20.0, alias="lambda", ge=0, description="weight of the clusterability loss")
    matrices: list[Literal["mlp_in", "mlp_out"]] = Field(default_factory=lambda: ["mlp_in", "mlp_out"], min_length=1)
    partition: Literal["spectral", "contiguous"] = "spectral"
    partition_at_step: int = Field(0, ge=0, description="step at which the partition is computed")
    partition_every: int = Field(
        0,
        ge=0,
        description="steps between recomputations of the partition, by the "
        "partitioner actors; 0 = once, at partition_at_step",
    )
    seed: int = 0


class PartitionerSpec(Section):
    """The Ray actors that compute partitions off the training path (``orchestrator.partitioning``)."""

    actors: int = Field(1, ge=1, description="partitioner actors; each takes a share of the MLP groups")
    cpus: float = Field(0, ge=0, description="CPUs reserved per actor; 0 shares the trainers' (small machines)")
    gpus: float = Field(0, ge=0, description="GPUs per actor; > 0 co-clusters on the GPU")
    heatmap_every: int = Field(
        10, ge=1, description="versions between heatmap artifacts (the first and the end of training always get one)"
    )
    delay_s: float = Field(
        0,
        ge=0,
        description="seconds each partition waits before computing: simulates a "
        "slow partitioner in tests and benchmarks",
    )
    adopt_after_steps: int = Field(
        0,
        ge=0,
        description="0 = every rank adopts a new version at the step after rank 0 sees it (training never "
        "waits, but the step depends on timing); N = the version requested at step s is "
        "adopted at step s + N exactly, rank 0 waiting for it there if needed, so a resumed "
        "run repeats the same sequence; at most modularity.partition_every",
    )


Tau = Annotated[float, Field(gt=0, le=1)]
CircuitMethod = Literal["greedy", "attribution", "specialization"]


CIRCUIT_TASK_FORMS = "labels, labels:0+1,2+3, synthetic, synthetic:copy,add, jsonl:FILE, text:FILE"


class CircuitsSpec(Section):
    """Circuits and cluster specialization of the model being trained (``orchestrator.circuit_report``)."""

    method: Literal["all"] | CircuitMethod | Annotated[list[CircuitMethod], Field(min_length=1)] = Field(
        "all",
        description="greedy: exact per-weight pruning (the small classifiers only); attribution: "
        "integrated-gradient-ranked pruning (any model); specialization: cluster ablation; "
        "all: every one the model supports; or a list, e.g. [attribution, specialization]",
    )
    examples: Literal["auto", "held_out", "train"] = Field(
        "auto",
        description="a classifier's examples for its label tasks: held_out (its validation examples), train, or "
        "auto: held-out where there are enough, modular addition's training pairs (see circuit_report)",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description=f"task specs ({CIRCUIT_TASK_FORMS}); the model's own tasks when empty",
    )
    every_steps: int = Field(0, ge=0, description="steps between circuit measurements while training; 0 = off")
    attribution_on: Literal["actor", "ranks"] = Field(
        "actor",
        description="where the job's circuits are computed: actor (rank 0 gathers the weights for the circuits "
        "actor, training goes on) or ranks (attribution on the training ranks' own ZeRO-3 partitions, no whole "
        "matrix gathered; training pauses for it; deepspeed.zero_stage 3 and circuits.method: attribution)",
    )
    taus: list[Tau] = Field([0.8, 0.9, 0.95, 1.0], min_length=1, description="attribution's faithfulness levels")
    ig_steps: int = Field(8, ge=1, le=256, description="attribution's integrated-gradient steps")
    ablation: Literal["zero", "mean"] = Field(
        "zero", description="a cluster's hidden units set to zero or to their mean over the tasks' inputs"
    )
    null_draws: int = Field(
        20,
        ge=0,
        le=1000,
        description="random partitions of the same sizes for the specialization index's null (0 = none)",
    )
    eval_on_find_data: bool = Field(
        False,
        description="judge circuits on the examples that found them, as the papers do, instead of the held-out half",
    )
    max_examples: int = Field(2000, ge=2, le=100_000, description="examples per task, before the find/judge split")
    seed: int = 0
    cpus: float = Field(0, ge=0, description="CPUs reserved for the circuits actor; 0 shares the trainers'")
    gpus: float = Field(0, ge=0, description="GPUs for the circuits actor")

    @field_validator("method", mode="before")
    @classmethod
    def _one_method_or_a_list(cls, value: Any) -> Any:
        """One problem for a bad method, rather than one per member of the union it failed."""
        methods = get_args(CircuitMethod)
        if value == "all" or value in methods:
            return value
        if isinstance(value, list) and value and all(isinstance(item, str) and item in methods for item in value):
            return value
        raise PydanticCustomError(
            "circuit_method",
            "input should be all, greedy, attribution, specialization, or a list of the last three such as "
            "[attribution, specialization]",
        )


class TrackingSpec(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; a SQLite file under xcm-runs/ when omitted")
    experiment: str = "xcm"
    artifact_location: str | None = Field(None, description="artifact root for a new experiment")
    run_id: str | None = Field(
        None, description="an existing MLflow run to log into (set by xcm submit); a new run when omitted"
    )
    log_every_steps: int = Field(
        1,
        ge=1,
        description="steps between the per-step training metrics logged to "
        "MLflow (loss, clusterability, throughput; the last step "
        "always): each metric costs the tracking store CPU, and on "
        "a GPU each logged step a synchronisation",
    )
    system_metrics_every_s: float = Field(
        10,
        ge=0,
        description="seconds between samples of CPU, memory, disk, network and GPU use on rank 0's node, "
        "logged as MLflow system metrics by a thread beside the training loop; 0 = none",
    )
    log_model: bool | None = Field(
        None,
        description="log the trained model to the run as an MLflow model at the end (transformers with its "
        "tokenizer for language models, PyTorch for xcm's classifiers), from the last checkpoint; when "
        "omitted, logged if its fp32 weights fit tracking.log_model_max_gb",
    )
    log_model_max_gb: float = Field(
        4.0, gt=0, description="GB of fp32 weights above which the model is logged only when tracking.log_model: true"
    )
    register_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,250}$",
        description="a Model Registry name (letters, digits, _ . -): the logged model becomes its next version "
        "(logged whatever its size); a run whose model cannot be registered ends FAILED",
    )

    @field_validator("register_model")
    @classmethod
    def _registered_models_are_logged(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None and info.data.get("log_model") is False:
            raise PydanticCustomError(
                "register_unlogged",
                "cannot register a model that is not logged (tracking.log_model: false): "
                "remove tracking.log_model, or tracking.register_model",
            )
        return name


class CheckpointSpec(Section):
    storage_path: str | None = Field(None, description="Ray Train storage path; xcm-runs/checkpoints when omitted")
    every_steps: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; 2 or more leaves one to fall back on")
    max_failures: int = Field(
        0,
        ge=-1,
        description="worker failures survived by restarting from the last "
        "checkpoint (Ray Train FailureConfig); -1 = no limit",
    )


WorkerCount = Annotated[int, Field(ge=1)]


class ResourcesSpec(Section):
    num_workers: WorkerCount | tuple[WorkerCount, WorkerCount] = Field(
        2,
        description="workers; [min, max]: an elastic group that Ray Train starts with what fits (>= min), shrinks "
        "on a loss and grows back up to max, the global batch defined at max",
    )
    grow_check_every_s: float = Field(
        60,
        gt=0,
        description="an elastic group: seconds between Ray Train's looks for capacity to grow back into "
        "(each growth restarts the group from its last checkpoint)",
    )
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="peak TFLOP/s of one worker at the job's precision, for the MFU estimate; "
        "from the GPU's name (or a CPU default) when omitted",
    )

    @field_validator("num_workers")
    @classmethod
    def _range_in_order(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(workers, tuple) and workers[0] > workers[1]:
            raise PydanticCustomError(
                "worker_range",
                "min {low} is above max {high}: write [min, max] with min <= max, e.g. [{high}, {low}]",
                {"low": workers[0], "high": workers[1]},
            )
        return workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """The worker count that sizes everything fixed per run: the global batch, the resources reserved."""
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class JobSpec(Section):
    name: str = Field("xcm", pattern=r"^[A-Za-z0-9_.-]+$", description="run name (letters, digits, _ . -)")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    modularity: ModularitySpec = Field(default_factory=ModularitySpec)
    partitioner: PartitionerSpec = Field(default_factory=PartitionerSpec)
    circuits: CircuitsSpec = Field(default_factory=CircuitsSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    def resolved(self, workdir: Path) -> JobSpec:
        """Fill the defaults that depend on where the job runs, as absolute paths workers can use."""
        runs = (workdir / RUNS_DIRECTORY).resolve()
        uri = self.tracking.uri or f"sqlite:///{runs / 'mlflow.db'}"
        # A tracking server chooses its own artifact store; a local store needs one beside it (not ./mlruns).
        local_store = not uri.startswith(("http://", "https://", "databricks"))
        tracking = self.tracking.model_copy(
            update={
                "uri": uri,
                "artifact_location": self.tracking.artifact_location
                or ((runs / "artifacts").as_uri() if local_store else None),
            }
        )
        checkpointing = self.checkpointing.model_copy(
            update={
                "storage_path": self.checkpointing.storage_path or str(runs / "checkpoints"),
            }
        )
        return self.model_copy(
            update={"tracking": tracking, "checkpointing": checkpointing, "data": self.data.resolved(workdir, runs)}
        )

    def on_workers(self, workers: int) -> JobSpec:
        """The spec as a group of ``workers`` runs it: an elastic run keeps its global batch, defined at
        ``max_workers``, through the gradient accumulation (``worker_range_problems`` refused a range where
        some size cannot). A fixed spec is returned as it is."""
        if not self.resources.elastic:
            return self
        accumulation = self.training.gradient_accumulation_steps * self.resources.max_workers // workers
        return self.model_copy(
            update={"training": self.training.model_copy(update={"gradient_accumulation_steps": accumulation})}
        )

    def to_yaml(self) -> str:
        """The spec as a job file: what a run logs as ``spec.yaml`` and a checkpoint keeps as ``job.yaml``,
        loadable again with ``load_spec``; without the credentials of any URI (they come from the environment)."""
        return yaml.safe_dump(self.public_dump(), sort_keys=False)

    def public_dump(self) -> dict:
        """The spec as plain values, as it may be stored or shown: no URI keeps its credentials."""
        from orchestrator.credentials import strip_all

        return strip_all(self.model_dump(mode="json", by_alias=True))

    def flat_params(self) -> dict[str, str]:
        """The spec as ``section.key -> value`` strings, the shape MLflow params take."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = str(value)

        walk("", self.public_dump())
        return flat


def _shown(value: Any) -> str:
    """A value as an error line quotes it: its repr, cut short (a 100 000-item list must not fill the screen)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "...(cut)"


def validate_job(path: Path, overrides: list[str] = ()) -> tuple[JobSpec | None, list[SpecProblem], dict[str, int]]:
    """Read, override (``section.key=value``) and validate a job file against the schema alone: the spec (None
    when it does not validate), its problems, and each dotted key's line. The checks between sections and
    against the data, the model and the side jobs are ``orchestrator.train.job_checks.load_spec``'s."""
    raw, lines = read_job(path)
    problems = _apply_overrides(raw, overrides)
    try:
        return JobSpec.model_validate(raw), problems, lines
    except ValidationError as error:
        return None, problems + [_problem_from_pydantic(item, lines) for item in error.errors()], lines


def read_job(path: Path) -> tuple[dict, dict[str, int]]:
    """A job file's top-level mapping and the 1-based line of each dotted key, within the bounds above; raises
    SpecError for a missing, oversized, non-UTF-8, empty, malformed or bomb-shaped file or a duplicate key."""
    source = str(path)
    if not path.is_file():
        raise SpecError(
            source,
            [
                SpecProblem(
                    key="(file)",
                    message=f"no job file at {path.resolve()}",
                    fix="pass the path of a YAML job file, e.g. jobs/tiny.yaml",
                )
            ],
        )
    with path.open("rb") as file:
        data = file.read(MAX_JOB_BYTES + 1)
    if len(data) > MAX_JOB_BYTES:
        raise SpecError(
            source,
            [
                SpecProblem(
                    key="(file)",
                    message=f"larger than {MAX_JOB_BYTES // 1024} KiB (job files are a few KB)",
                    fix="pass a job file, not a data file; list data files in data.files",
                )
            ],
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            source,
            [
                SpecProblem(
                    key="(file)",
                    message=f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})",
                    fix="save the job file as UTF-8",
                    line=data[: error.start].count(b"\n") + 1,
                )
            ],
        ) from None
    try:
        raw, lines, duplicates = _parse_yaml(text)
    except YamlProblem as problem:
        raise SpecError(source, [problem.as_problem("(file)")]) from None
    if raw is None:
        raise SpecError(
            source,
            [
                SpecProblem(
                    key="(file)",
                    message="the job file is empty",
                    fix="write the job's sections as in jobs/tiny.yaml (`xcm run` with no file runs the default job)",
                )
            ],
        )
    if not isinstance(raw, dict):
        raise SpecError(
            source,
            [
                SpecProblem(
                    key="(file)",
                    message=f"the top level is a {type(raw).__name__}, not a mapping",
                    fix="write the job as 'section: {key: value}' mappings, as in jobs/tiny.yaml",
                )
            ],
        )
    if duplicates:
        raise SpecError(source, duplicates)
    return raw, lines


class YamlProblem(Exception):
    """YAML that cannot be loaded, or that exceeds the bounds: the message and the 1-based line."""

    def __init__(self, message: str, fix: str, line: int | None):
        super().__init__(message)
        self.message, self.fix, self.line = message, fix, line

    def as_problem(self, key: str) -> SpecProblem:
        return SpecProblem(key=key, message=self.message, fix=self.fix, line=self.line)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, bounded while it composes: at most MAX_NESTING levels deep (its composer recurses
    once per level: 20 000 ``[`` would end in RecursionError) and MAX_VALUES nodes once aliases are expanded
    (nine nested aliases of nine make 10^9 values out of 1 KB; PyYAML builds them shared, but everything that
    walks the result, from pydantic to the params logged to MLflow, would expand them).

    Each node's expanded size and depth are computed as its composition ends, from its children's, which have
    ended before it (an alias names a node composed earlier): linear in the file, whatever the aliases."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._open_nodes = 0
        self._extent: dict[int, tuple[int, int]] = {}  # id(node) -> (values once expanded, depth once expanded)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._extent:  # a node still being composed: the alias is inside its anchor
                raise YamlProblem(
                    "an alias refers to a node that contains it", "remove the recursive alias", mark.line + 1
                )
            return node
        self._open_nodes += 1
        if self._open_nodes > MAX_NESTING:
            raise YamlProblem(
                f"nested more than {MAX_NESTING} deep", "flatten the structure; a job nests 4 deep", mark.line + 1
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open_nodes -= 1
        self._measure(node, mark)
        return node

    def _measure(self, node: yaml.Node, mark) -> None:
        if isinstance(node, yaml.ScalarNode):
            self._extent[id(node)] = (1, 1)
            return
        children = (
            [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else node.value
        )
        extents = [self._extent[id(child)] for child in children]
        values = 1 + sum(size for size, _ in extents)
        depth = 1 + max((child_depth for _, child_depth in extents), default=0)
        if values > MAX_VALUES:
            raise YamlProblem(
                f"its aliases expand to more than {MAX_VALUES} values",
                "write the values out instead of nesting aliases",
                mark.line + 1,
            )
        if depth > MAX_NESTING:
            raise YamlProblem(
                f"its aliases expand to more than {MAX_NESTING} levels of nesting",
                "flatten the structure; a job nests 4 deep",
                mark.line + 1,
            )
        self._extent[id(node)] = (values, depth)


def _parse_yaml(text: str) -> tuple[Any, dict[str, int], list[SpecProblem]]:
    """The value the YAML text holds, within the loader's bounds, with its keys' lines and duplicates (read
    before the value is built: building merges ``<<`` keys into their mappings)."""
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters in the whole text at once
    except yaml.reader.ReaderError as error:
        raise YamlProblem(
            f"not valid YAML (the character {chr(error.character)!r} is not allowed)",
            "remove it; a job file is plain text",
            text[: error.position].count("\n") + 1,
        ) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}, []
        lines, duplicates = _key_lines(root)
        return loader.construct_document(root), lines, duplicates
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise YamlProblem(
            f"not valid YAML ({getattr(error, 'problem', None) or error})",
            "correct the YAML syntax",
            mark.line + 1 if mark else None,
        ) from None
    finally:
        loader.dispose()


def param_name_problems(spec: JobSpec) -> list[SpecProblem]:
    """Every key of the spec becomes an MLflow param (``flat_params``), so a key MLflow cannot name (one nested
    in model.config) would fail the run only once it exists: MLflow takes letters, digits, ``_ - . / :`` and
    spaces, at most 250 of them, and no name that path normalisation changes (``a//b``, ``..``)."""
    return [
        SpecProblem(
            key=key,
            message="MLflow cannot take this key as a param name",
            fix="use letters, digits, _ - . / : and spaces, at most 250 characters, no empty or '..' part",
        )
        for key in spec.flat_params()
        if not _MLFLOW_PARAM_NAME.fullmatch(key) or posixpath.normpath(key) != key
    ]


def worker_range_problems(spec: JobSpec) -> list[SpecProblem]:
    """An elastic group may run at any size in ``[min, max]``, and each must keep the global batch of
    ``micro_batch_size x gradient_accumulation_steps x max``: its accumulation times ``max`` divides by it."""
    resources, accumulation = spec.resources, spec.training.gradient_accumulation_steps
    if not resources.elastic:
        return []
    if spec.deepspeed.zero_stage == 0:
        return [
            SpecProblem(
                key="resources.num_workers",
                message="an elastic group resizes through DeepSpeed's universal checkpoint, which needs ZeRO 1-3",
                fix="set deepspeed.zero_stage: 1, 2 or 3, or a fixed num_workers",
            )
        ]
    micro_batches = accumulation * resources.max_workers  # per worker-step of one global batch
    breaking = [n for n in range(resources.min_workers, resources.max_workers + 1) if micro_batches % n]
    if not breaking:
        return []
    keeping_min = resources.max_workers  # the lowest min from which every size up to max keeps it
    while keeping_min > 1 and micro_batches % (keeping_min - 1) == 0:
        keeping_min -= 1
    every_size = math.lcm(*range(resources.min_workers, resources.max_workers + 1))
    fitting_accumulation = every_size // math.gcd(every_size, resources.max_workers)
    return [
        SpecProblem(
            key="resources.num_workers",
            message=f"{', '.join(map(str, breaking))} workers cannot keep the global batch of {micro_batches} "
            f"micro-batches ({accumulation} accumulated x {resources.max_workers} workers)",
            fix=f"use num_workers [{keeping_min}, {resources.max_workers}], or "
            f"training.gradient_accumulation_steps: {fitting_accumulation} (a multiple of it)",
        )
    ]


def _apply_overrides(raw: dict, overrides: list[str]) -> list[SpecProblem]:
    """Set each ``section.key=value`` in ``raw``; the value is YAML, held to a job file's bounds."""
    problems = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            problems.append(
                SpecProblem(
                    key=override,
                    message="an override must read section.key=value",
                    fix="write e.g. --set training.lr=3e-4",
                )
            )
            continue
        *parents, leaf = key.split(".")
        if len(parents) >= MAX_NESTING or len(value) > MAX_JOB_BYTES:
            problems.append(
                SpecProblem(
                    key=key[:SHOWN_CHARACTERS],
                    message="the override is too long",
                    fix="override one key of a section, e.g. training.lr=3e-4",
                )
            )
            continue
        try:
            parsed, _, duplicates = _parse_yaml(value)
        except YamlProblem as problem:
            problems.append(problem.as_problem(key).model_copy(update={"line": None}))
            continue
        if duplicates:
            problems += [
                problem.model_copy(update={"key": f"{key}.{problem.key}", "line": None}) for problem in duplicates
            ]
            continue
        target = raw
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                problems.append(
                    SpecProblem(
                        key=key,
                        message=f"'{parent}' is not a section",
                        fix="override a key inside a section, e.g. training.lr",
                    )
                )
                break
        else:
            target[leaf] = parsed
    return problems


def _problem_from_pydantic(item: dict, lines: dict[str, int]) -> SpecProblem:
    key = ".".join(str(part) for part in item["loc"])
    kind = item["type"]
    if kind == "extra_forbidden":
        message, fix = "unknown key", f"remove it or correct its spelling ({_known_keys(item['loc'])})"
    elif kind == "missing":
        message, fix = "required key is missing", "add it"
    else:
        message = item["msg"][0].lower() + item["msg"][1:]
        fix = f"got {_shown(item.get('input'))}; {_field_hint(item['loc'])}"
    return SpecProblem(key=key, message=message, fix=fix, line=lines.get(key))


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _known_keys(loc: tuple) -> str:
    model = _section_model(loc)
    if model is None:
        return "see jobs/tiny.yaml"
    names = [field.alias or name for name, field in model.model_fields.items()]
    return "known keys: " + ", ".join(names)


def _field_hint(loc: tuple) -> str:
    model = _section_model(loc)
    field = None
    if model is not None:
        field = model.model_fields.get(str(loc[-1])) or next(
            (f for f in model.model_fields.values() if f.alias == loc[-1]), None
        )
    if field is not None and field.description:
        return f"expected {field.description}"
    return "see jobs/tiny.yaml for a valid value"


def _key_lines(root: yaml.Node) -> tuple[dict[str, int], list[SpecProblem]]:
    """Each dotted key of the composed file with its 1-based line, so errors can point into the file; and a
    problem for each key written twice in one mapping (YAML would silently keep the last)."""
    lines: dict[str, int] = {}
    duplicates: list[SpecProblem] = []
    checked: set[int] = set()  # mappings reached again through an alias report their duplicates once

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys written beside it override the merged ones, by design
            name = str(key_node.value)
            key, line = f"{prefix}.{name}" if prefix else name, key_node.start_mark.line + 1
            if name in first_lines and id(node) not in checked:
                duplicates.append(
                    SpecProblem(
                        key=key,
                        message=f"written twice, on lines {first_lines[name]} and {line}",
                        fix="keep one of them",
                        line=line,
                    )
                )
            first_lines.setdefault(name, line)
            lines[key] = line
            walk(value_node, key)
        checked.add(id(node))

    walk(root, "")
    return lines, duplicates

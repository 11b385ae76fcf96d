"""What a model's clusters buy. Per task, the circuit the exact greedy finder or attribution-ranked pruning keeps
(its size and how much of it lies inside the clusters), and how task-specialised the clusters are (the
specialization index against its null, each task's concentration), printed and logged to one MLflow run.

This is the half that computes and reports, for ``xcm circuits`` (``circuit_command``, which loads the model) and
for the circuits side job (``circuit_job``, which rebuilds the model being trained from the spec). It stands
below ``orchestrator.train`` and reads no checkpoint.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from orchestrator import metric_names
from orchestrator.circuit_tasks import (
    Kind,
    TaskContext,
    TaskData,
    TaskError,
    TaskSet,
    build_task_set,
    check_task_specs,
    classifier_metric,
    language_examples,
    language_metric,
)

if TYPE_CHECKING:
    from orchestrator.circuits import AttributionCircuit, Circuit, Specialization
    from orchestrator.data.examples import LabelledExamples
    from orchestrator.data.tokenizer import TextTokenizer
    from orchestrator.modularity import GroupPartition
    from orchestrator.spec import CircuitsSpec, JobSpec

METHODS = ("greedy", "attribution", "specialization")
BATCH_SIZE = 64
BOOTSTRAPS = 200
HEADLINE_TAU = 0.9  # attribution's size and locality under the bare names, when 0.9 is among the taus
MIN_HELD_OUT_PER_CLASS = 100
HELD_OUT_BY_FRACTION = ("digits", "modular_addition")  # sources whose held-out share is data.validation_fraction
Progress = Callable[[str], None]


class CircuitsError(ValueError):
    """A request xcm circuits cannot serve: the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for circuits, with what its tasks and partition come from."""

    model: nn.Module
    kind: Kind
    partitions: dict[str, GroupPartition] | None  # the checkpoint's or the export's
    matrices: tuple[str, ...] = ("mlp_in", "mlp_out")
    tokenizer: TextTokenizer | None = None
    labelled: LabelledExamples | None = None
    label_prefix: str = "label"
    max_positions: int = 1024
    default_tasks: tuple[str, ...] = ()
    step: int = 0
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass
class CircuitsResult:
    tasks: tuple[str, ...]
    partition: str  # where the partition came from
    k: int
    greedy: dict[str, Circuit] = field(default_factory=dict)
    attribution: dict[str, AttributionCircuit] = field(default_factory=dict)
    specialization: Specialization | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # "method task" -> why


# ---- the methods and tasks a model gets -------------------------------------------------------------------------


def methods_for(method: str | Sequence[str], kind: str, fix: str = "--method attribution") -> list[str]:
    """The methods to run, in `METHODS` order: one, a list (attribution and specialization without greedy, whose
    exact pruning outlasts a CPU's wait at the end of training on modular addition's attention), or with "all"
    every one the model supports (greedy for classifiers only). Greedy asked for a language model is refused,
    naming `fix`."""
    if method == "all":
        return [m for m in METHODS if m != "greedy" or kind == "classifier"]
    asked = [method] if isinstance(method, str) else list(method)
    if "greedy" in asked and kind == "language":
        raise CircuitsError(
            "the greedy finder prunes one weight at a time with exact loss recomputation, which is for xcm's small "
            f"classifiers (MNIST MLP, CIFAR CNN, modular addition), not a language model; use {fix}"
        )
    return [m for m in METHODS if m in asked]


def job_problems(spec: JobSpec) -> list[str]:
    """The circuits section's problems for a job that trains `spec.model`: greedy for a transformers family,
    held-out examples asked of a language model or of a classifier that holds none out."""
    try:
        methods_for(spec.circuits.method, model_kind(spec), fix="circuits.method: attribution")
    except CircuitsError as error:
        return [str(error)]
    if spec.circuits.examples != "auto" and model_kind(spec) == "language":
        return ["circuits.examples picks a classifier's examples; a language model's tasks bring their own: remove it"]
    held_out_asked = spec.circuits.examples == "held_out" and spec.data.source in HELD_OUT_BY_FRACTION
    if held_out_asked and spec.data.validation_fraction == 0:
        return ["circuits.examples: held_out, but the job holds no examples out; set data.validation_fraction"]
    return []


def task_problems(spec: JobSpec, base_dir: Path | None) -> list[str]:
    """The problems of the tasks a job's circuits would measure, found from the spec alone (and the task files
    under `base_dir`, where given) before anything starts, rather than by the actor after the first steps."""
    if spec.circuits.every_steps == 0 and not spec.circuits.tasks:
        return []  # the default of a side job that does not run
    specs = spec.circuits.tasks or list(own_tasks(spec))
    if not specs:
        return ["the model has no tasks of its own (it does not train on the synthetic corpus) and none are named"]
    try:
        check_task_specs(specs, model_kind(spec), _class_count(spec), base_dir)
    except TaskError as error:
        return [str(error)]
    return []


# ---- the job's model --------------------------------------------------------------------------------------------


def model_kind(spec: JobSpec) -> Kind:
    from orchestrator.models.classifiers import CLASSIFIER_FAMILIES

    return "classifier" if spec.model.family in CLASSIFIER_FAMILIES else "language"


def own_tasks(spec: JobSpec) -> tuple[str, ...]:
    """The tasks a job's model is measured on when none are named: a classifier's labels, the synthetic corpus's
    tasks it trained on; none for a language model trained on other text."""
    if model_kind(spec) == "classifier":
        return ("labels",)
    if spec.data.source != "synthetic":
        return ()
    return ("synthetic" + (f":{','.join(spec.data.tasks)}" if spec.data.tasks else ""),)


def _class_count(spec: JobSpec) -> int:
    from orchestrator.models.classifiers import NUM_IMAGE_CLASSES

    return spec.data.modulus if spec.model.family == "modular_addition" else NUM_IMAGE_CLASSES


def fresh_model(spec: JobSpec, tokenizer: TextTokenizer | None = None) -> nn.Module:
    """The job's model with seed-0 weights, for trained weights to be loaded into: a language model at its
    tokenizer's vocabulary, modular addition at its modulus's."""
    from orchestrator.models.registry import build_model

    if spec.model.family == "modular_addition":
        return build_model(spec.model, spec.data.modulus + 1, seed=0)
    return build_model(spec.model, None if tokenizer is None else tokenizer.vocab_size, seed=0)


def loaded_model_from_spec(
    spec: JobSpec,
    model: nn.Module | None = None,
    partitions: dict[str, GroupPartition] | None = None,
    step: int = 0,
    provenance: dict[str, str] | None = None,
) -> LoadedModel:
    """A job's model as circuits hold it, with its kind, matrices, own tasks and data (a classifier's examples, a
    language model's tokenizer) from the spec: `model` (a checkpoint's), or the spec's built by `fresh_model`."""
    matrices = tuple(spec.modularity.matrices)
    provenance = provenance or {}
    if model_kind(spec) == "language":
        from orchestrator.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spec.data, spec.model)
        model = model if model is not None else fresh_model(spec, tokenizer)
        return language_loaded(model, partitions, tokenizer, provenance, matrices, step, own_tasks(spec))
    return LoadedModel(
        (model if model is not None else fresh_model(spec)).eval(),
        "classifier",
        partitions,
        matrices,
        labelled=_classifier_examples(spec),
        label_prefix="answer" if spec.data.source == "modular_addition" else "label",
        default_tasks=own_tasks(spec),
        step=step,
        provenance=provenance,
    )


def language_loaded(model, partitions, tokenizer, provenance, matrices=("mlp_in", "mlp_out"), step=0, tasks=()):
    """A language model as circuits hold it; its context length from its config."""
    config = model.config
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
    return LoadedModel(
        model.eval(),
        "language",
        partitions,
        tuple(matrices),
        tokenizer,
        max_positions=int(positions),
        default_tasks=tuple(tasks),
        step=step,
        provenance=provenance,
    )


def _classifier_examples(spec: JobSpec) -> LabelledExamples:
    """The job's own examples at the model's input shape, as `circuits.examples` picks them; under auto, the
    held-out ones when there are enough of them (`MIN_HELD_OUT_PER_CLASS` a class on average), else every example
    (digits holds out ~18 a class).

    Auto gives modular addition its training pairs: its held-out pairs measure grokking, and before it groks the
    model is confidently wrong on them (eval loss ~10 nats against log 113 = 4.7 for a uniform guess), so ablating
    every cluster improves every answer, no task has a real full-vs-ablated gap and the specialization index is
    undefined. A model that has grokked computes the sum on pairs it never trained on, and held_out measures its
    circuits there."""
    from orchestrator.data.examples import LabelledExamples
    from orchestrator.data.sources import BUILDERS

    data = BUILDERS[spec.data.source](spec.data, spec.model)
    if spec.circuits.examples == "held_out":
        if data.validation is None:
            raise CircuitsError("circuits.examples: held_out, but the job holds no examples out; set it to train")
        return data.validation
    if spec.circuits.examples == "train" or spec.data.source == "modular_addition":
        return data.train
    if data.validation is not None and len(data.validation) >= MIN_HELD_OUT_PER_CLASS * data.num_classes:
        return data.validation
    if data.validation is None:
        return data.train
    return LabelledExamples(
        torch.cat([data.validation.inputs, data.train.inputs]), torch.cat([data.validation.labels, data.train.labels])
    )


# ---- computing --------------------------------------------------------------------------------------------------


def fresh_partitions(model: nn.Module, k: int, matrices: Sequence[str]) -> dict[str, GroupPartition]:
    """A spectral partition of every group into `k` clusters, as training computes one."""
    from orchestrator.modularity import find_matrix_groups, partition_group

    partitions = {}
    with torch.no_grad():
        for group in find_matrix_groups(model, matrices):
            hidden = group.matrices[0].shape[0] if group.inputs else group.matrices[0].shape[1]
            if k > hidden:
                raise CircuitsError(f"--k {k} is more clusters than {group.name}'s {hidden} hidden units; lower --k")
            inputs = [m.weight().detach().float() for m in group.inputs]
            outputs = [m.weight().detach().float() for m in group.outputs]
            partitions[group.name] = partition_group(inputs, outputs, k)
    return partitions


CONTROL_PARTITION = "spectral, the control's own (lambda 0)"


def measurement_partitions(
    loaded: LoadedModel, spec: JobSpec, training: Mapping[str, GroupPartition] | None
) -> tuple[dict[str, GroupPartition], str]:
    """The partition a training job's circuits are measured under, and its label. A model trained with the loss
    is measured under the partition it was trained to respect. A control (lambda 0) respected none: under the
    training partition its specialization sits at chance by construction, so it gets what the loss-on model's
    partitioner finds in a trained model's weights, the spectral co-clustering of its own weights."""
    if training is not None and spec.modularity.lambda_ > 0:
        return dict(training), "training"
    chosen = fresh_partitions(loaded.model, spec.modularity.k, loaded.matrices)
    return chosen, CONTROL_PARTITION if training is not None else "fresh spectral"


def task_set_for(loaded: LoadedModel, specs: Sequence[str], options: CircuitsSpec, base_dir: Path) -> TaskSet:
    specs = list(specs) or list(loaded.default_tasks)
    if not specs:
        raise CircuitsError(
            "this model has no tasks of its own here (it was not trained on the synthetic corpus); "
            "pass --tasks jsonl:FILE or text:FILE"
        )
    context = TaskContext(
        loaded.kind,
        base_dir=base_dir,
        labelled=loaded.labelled,
        label_prefix=loaded.label_prefix,
        tokenizer=loaded.tokenizer,
        max_positions=loaded.max_positions,
        seed=options.seed,
        eval_on_find_data=options.eval_on_find_data,
        max_examples=options.max_examples,
    )
    return build_task_set(specs, context)


def find_circuits(
    loaded: LoadedModel,
    task_set: TaskSet,
    partitions: Mapping[str, GroupPartition],
    partition_source: str,
    methods: Sequence[str],
    options: CircuitsSpec,
    progress: Progress,
) -> CircuitsResult:
    """Every requested method on every task: circuits on each task's finding half, judged on the other."""
    k = max(partition.k for partition in partitions.values())
    result = CircuitsResult(tuple(task_set.names()), partition_source, k)
    for method in (m for m in methods if m != "specialization"):
        for index, task in enumerate(task_set.tasks, 1):
            started = time.monotonic()
            progress(f"{method} circuit of {task.name} ({index}/{len(task_set.tasks)})")
            try:
                circuit = _circuit(method, loaded, task_set.kind, task.find, task.judge, partitions, options)
                getattr(result, method)[task.name] = circuit
            except ValueError as error:
                result.skipped[f"{method} {task.name}"] = str(error)
            progress(f"  done in {time.monotonic() - started:.1f} s")
    if "specialization" in methods:
        started = time.monotonic()
        progress(
            f"specialization: ablating {k} clusters on {len(task_set.tasks)} tasks, {options.null_draws} null draws"
        )
        try:
            result.specialization = _specialization(loaded, task_set, partitions, options)
        except ValueError as error:
            result.skipped["specialization"] = str(error)
        if result.specialization is not None and not result.specialization.used.any():
            result.skipped["specialization index"] = (
                "no task has a real full-vs-ablated gap (the model does no better on the judged examples than with "
                "every cluster ablated), so the index is undefined"
            )
        progress(f"  done in {time.monotonic() - started:.1f} s")
    return result


def _circuit(method, loaded, kind, find: TaskData, judge: TaskData, partitions, options):
    from orchestrator.circuits import attribution_weight_circuit, greedy_weight_circuit

    if method == "greedy":
        return greedy_weight_circuit(
            loaded.model,
            find.inputs,
            find.targets,
            partition=dict(partitions),
            seed=options.seed,
            other={"judge": (judge.inputs, judge.targets)},
        )
    return attribution_weight_circuit(
        loaded.model,
        find.batches(BATCH_SIZE),
        classifier_metric if kind == "classifier" else language_metric,
        ig_steps=options.ig_steps,
        taus=options.taus,
        eval_batches=None if options.eval_on_find_data else judge.batches(BATCH_SIZE),
        partition=dict(partitions),
    )


def _specialization(loaded, task_set, partitions, options) -> Specialization:
    from orchestrator.circuits import ablation_specialization, classifier_examples, hidden_layers

    tasks = {task.name: (task.judge.inputs, task.judge.targets) for task in task_set.tasks}
    results = ablation_specialization(
        loaded.model,
        hidden_layers(loaded.model, partitions),
        tasks,
        mode=options.ablation,
        scope="module",
        evaluate=classifier_examples if task_set.kind == "classifier" else language_examples,
        null_draws=options.null_draws,
        bootstraps=BOOTSTRAPS,
        seed=options.seed,
        batch_size=BATCH_SIZE,
    )
    return results["module"]


# ---- reporting --------------------------------------------------------------------------------------------------


def headline_tau(taus) -> float:
    """Attribution's τ whose size and locality go under the bare metric names."""
    taus = sorted(taus)
    return HEADLINE_TAU if HEADLINE_TAU in taus else taus[-1]


def result_metrics(result: CircuitsResult) -> dict[str, float]:
    """Every scalar: the named headline metrics, then each circuit's and the specialization's own, prefixed.
    The bare size and locality are the exact greedy circuit's where it ran, else attribution's at the headline τ."""
    values: dict[str, float] = {}
    for task, circuit in result.greedy.items():
        values[metric_names.circuit_size(task)] = circuit.size
        if circuit.locality is not None:
            values[metric_names.circuit_locality(task)] = circuit.locality.share
        values |= {f"circuits/greedy/{task}/{key}": value for key, value in circuit.metrics().items()}
    for task, circuit in result.attribution.items():
        tau = headline_tau(circuit.size_at)
        values |= {metric_names.circuit_size(task, t): size for t, size in circuit.size_at.items()}
        values.setdefault(metric_names.circuit_size(task), circuit.size_at[tau])
        if circuit.locality is not None:
            values.setdefault(metric_names.circuit_locality(task), circuit.locality[tau].share)
        values |= {f"circuits/attribution/{task}/{key}": value for key, value in circuit.metrics().items()}
    if result.specialization is not None:
        values |= {f"specialization/{key}": value for key, value in result.specialization.metrics().items()}
    return values


def format_table(result: CircuitsResult) -> str:
    """One row per task: each method's circuit size and locality, attribution's size per τ, the task's
    concentration; then the specialization index with its null."""
    taus = sorted({tau for circuit in result.attribution.values() for tau in circuit.size_at})
    width = max(len("task"), *(len(task) for task in result.tasks))
    header = f"{'task':<{width}}  {'greedy':>8}  {'local':>6}  {'attrib':>8}  {'local':>6}"
    header += "".join(f"  {f'tau{tau:g}':>8}" for tau in taus) + f"  {'conc':>6}"
    lines = [f"partition: {result.partition} (k={result.k})", header]
    concentration = _concentrations(result.specialization)
    for task in result.tasks:
        greedy, attribution = result.greedy.get(task), result.attribution.get(task)
        tau = headline_tau(attribution.size_at) if attribution else None
        row = f"{task:<{width}}  {_cell(greedy and greedy.size, 8)}"
        row += f"  {_cell(greedy and greedy.locality and greedy.locality.share, 6)}"
        row += f"  {_cell(attribution and attribution.size_at[tau], 8)}"
        row += f"  {_cell(attribution and attribution.locality and attribution.locality[tau].share, 6)}"
        row += "".join(f"  {_cell(attribution and attribution.size_at.get(t), 8)}" for t in taus)
        lines.append(row + f"  {_cell(concentration.get(task), 6)}")
    lines += _specialization_lines(result.specialization)
    lines += [f"skipped {what}: {why}" for what, why in result.skipped.items()]
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    if value is None or value is False:
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}"


def _concentrations(specialization) -> dict[str, float]:
    if specialization is None:
        return {}
    return {task: float(c) for task, c in zip(specialization.tasks, specialization.concentration, strict=True)}


def _specialization_lines(specialization) -> list[str]:
    if specialization is None:
        return []
    line = f"specialization index {specialization.index:.4f}"
    if specialization.interval is not None:
        line += f" (95% CI {specialization.interval[0]:.4f}..{specialization.interval[1]:.4f})"
    if specialization.null is not None:
        null = specialization.null
        line += f"; null {null.mean:.4f} ± {null.sd:.4f} over {len(null.values)} random partitions, z {null.z:.2f}"
    unused = [task for task, used in zip(specialization.tasks, specialization.used, strict=True) if not used]
    notes = [f"tasks left out (no real full-vs-ablated gap): {', '.join(unused)}"] if unused else []
    legend = (
        "greedy/attrib: circuit size (kept share of the scoped weights); local: share inside the clusters; "
        f"attrib at tau {HEADLINE_TAU:g} when given; conc: task concentration"
    )
    return [
        legend,
        line,
        *notes,
    ]


def result_artifacts(result: CircuitsResult, model: nn.Module, partitions) -> dict[str, bytes]:
    """Artifact path -> bytes: each circuit's per-matrix mask summary (Parquet), the damage matrix (Parquet and
    heatmap), the dependence histogram, and the printed table."""
    from orchestrator.circuits.locality import resolve_partition

    labels = resolve_partition(model, dict(partitions))
    artifacts = {"circuits.txt": (format_table(result) + "\n").encode()}
    for task, circuit in result.greedy.items():
        artifacts[f"circuits/greedy/{task}.parquet"] = parquet_rows(mask_summary(circuit.mask, labels))
    for task, circuit in result.attribution.items():
        rows = [row | {"tau": tau} for tau, mask in circuit.masks.items() for row in mask_summary(mask, labels)]
        artifacts[f"circuits/attribution/{task}.parquet"] = parquet_rows(rows)
    if result.specialization is not None:
        damage = result.specialization.damage  # [k, T]
        columns = {"cluster": list(range(damage.shape[0]))}
        columns |= {task: damage[:, t].tolist() for t, task in enumerate(result.specialization.tasks)}
        artifacts["specialization/damage.parquet"] = _parquet_columns(columns)
        artifacts["specialization/damage.png"] = damage_heatmap(damage, result.specialization.tasks)
        if result.specialization.dependence is not None:
            artifacts["specialization/dependence.png"] = dependence_histogram(result.specialization.dependence)
    return artifacts


def mask_summary(mask: Mapping[str, torch.Tensor], labels) -> list[dict]:
    """Per matrix: kept weights, size, kept share, and the share of its kept weights inside the clusters."""
    from orchestrator.circuits import circuit_locality

    blocks = {}
    if labels and any(name in labels for name in mask):
        blocks = circuit_locality(mask, labels).blocks
    return [summary_row(name, int(kept.sum()), kept.numel(), blocks.get(name)) for name, kept in mask.items()]


def summary_row(name: str, count: int, size: int, block: torch.Tensor | None) -> dict:
    """One matrix's row of a mask summary: `count` of its `size` weights kept, and the share of them inside the
    clusters from its locality `block` (NaN without one, or with nothing kept)."""
    inside = float(torch.diagonal(block).sum() / block.sum()) if block is not None and block.sum() else math.nan
    return {"matrix": name, "kept": count, "size": size, "share": count / size, "locality": inside}


def parquet_rows(rows: list[dict]) -> bytes:
    return _parquet_columns({key: [row[key] for row in rows] for key in rows[0]} if rows else {})


def _parquet_columns(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def damage_heatmap(damage: np.ndarray, tasks: Sequence[str]) -> bytes:
    """PNG of the cluster × task damage matrix (share of each task's performance lost with the cluster off)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.6 * len(tasks) + 2), max(3.0, 0.4 * damage.shape[0] + 1.5)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(damage, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(shown, ax=axes, label="damage (share of the task's gap)")
    axes.set_xticks(range(len(tasks)), list(tasks), rotation=45, ha="right")
    axes.set_yticks(range(damage.shape[0]))
    axes.set_xlabel("task")
    axes.set_ylabel("cluster ablated")
    figure.tight_layout()
    return _png(figure)


def dependence_histogram(dependence) -> bytes:
    """PNG of how many clusters' ablation alone breaks a correct example (share of affected examples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    counts = np.arange(1, len(dependence.histogram) + 1)
    axes.bar(counts, dependence.histogram, yerr=np.nan_to_num(dependence.histogram_se), capsize=3)
    axes.set_xticks(counts)
    axes.set_xlabel("clusters whose ablation alone breaks the example")
    axes.set_ylabel("share of affected examples")
    axes.set_title(f"{dependence.correct} correct examples, {dependence.affected_share:.0%} affected")
    figure.tight_layout()
    return _png(figure)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def log_result(
    result: CircuitsResult,
    loaded: LoadedModel,
    partitions,
    params: dict[str, str],
    tracking_uri: str,
    experiment: str,
    workdir: Path,
) -> str:
    """One MLflow run: the metrics at the checkpoint's step (0 for other models), the artifacts; its id."""
    from mlflow.entities import Metric

    from orchestrator import tracking
    from orchestrator.spec import JobSpec

    store = JobSpec.model_validate({"tracking": {"uri": tracking_uri, "experiment": experiment}}).resolved(workdir)
    name = f"circuits-{Path(params['source']).name or params['source']}"
    run_id = tracking.start_run(store.tracking, name, params)
    try:
        mlflow = tracking.client(store.tracking.uri)
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, loaded.step)
            for key, value in result_metrics(result).items()
            if math.isfinite(value)  # NaN (a task left out) and inf (a null without spread) are in the table only
        ]
        for start in range(0, len(metrics), 1000):
            mlflow.log_batch(run_id, metrics=metrics[start : start + 1000])
        with tempfile.TemporaryDirectory(prefix="xcm-circuits-artifacts-") as directory:
            for path, data in result_artifacts(result, loaded.model, partitions).items():
                (Path(directory) / path).parent.mkdir(parents=True, exist_ok=True)
                (Path(directory) / path).write_bytes(data)
            mlflow.log_artifacts(run_id, directory)
    except BaseException as error:
        tracking.fail_run(store.tracking.uri, run_id, f"{type(error).__name__}: {error}")
        raise
    tracking.end_run(store.tracking.uri, run_id, "FINISHED")
    return run_id

"""The comparison report, built from MLflow alone: the parent run's plan and its child runs' final metrics.

``xcm experiment`` writes it when its trials end, and ``xcm experiment --report PARENT_RUN_ID`` writes it again
from the store, so both read the same things: the plan the parent run logged (``experiment/plan.json``: the
variants in order, each one's control, the seeds, the metrics asked for) and each child run (tag
``mlflow.parentRunId``) with its variant and seed tags and its metrics' last values. Into the parent run go
``comparison/comparison.md``, one Parquet table per metric under ``comparison/tables/``, every trial's values
in ``comparison/trials.parquet``, and PNG plots: task metric against clusterability (one point per seed per
variant: the trade-off curve of a λ sweep) and, when runs log ``circuits/size/<task>``, circuit size per task.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator import metric_names
from orchestrator.experiments.statistics import comparison_rows

PLAN_ARTIFACT = "experiment/plan.json"
REPORT_DIRECTORY = "comparison"
VARIANT_TAG, SEED_TAG, PARENT_TAG = "xcm.variant", "xcm.seed", "mlflow.parentRunId"
EXPERIMENT_TAG = "xcm.experiment"  # on the parent run: the experiment's name
DEFAULT_METRICS = (
    metric_names.CLUSTERABILITY,
    metric_names.TASK_LOSS,
    metric_names.EVAL_LOSS,
    metric_names.EVAL_ACCURACY,
    metric_names.EVAL_PERPLEXITY,
    metric_names.TOKENS_PER_SECOND,
    metric_names.SAMPLES_PER_SECOND,
)
# The circuits side job's headline figures, compared when a run has them: the specialization index with its
# null over random partitions of the same sizes, and (computed here from each run's per-task sizes) the mean
# circuit size over the tasks: the exact greedy circuit's where it ran, and attribution's at each τ.
SPECIALIZATION_METRICS = (
    metric_names.SPECIALIZATION_INDEX,
    metric_names.SPECIALIZATION_INDEX_Z,
    metric_names.SPECIALIZATION_INDEX_NULL_MEAN,
    "specialization/index_null_sd",
    "specialization/sufficiency_index",
)
CIRCUIT_SIZE_PREFIX = "circuits/size/"
MEAN_CIRCUIT_SIZE = "circuits/mean_size"  # + "/tau<τ>" for attribution's sizes at one faithfulness level
# Families of one metric per task, each compared per task and shown as one table with a task column: per-task
# eval losses, circuit sizes (``circuits/size/<task>``, ``circuits/size/<task>/tau0.9``), circuit locality and
# each task's concentration on one cluster. The methods' detail (``circuits/greedy/...``, timings, the
# dependence histogram) stays in the child runs.
TASK_FAMILY_PREFIXES = (
    metric_names.EVAL_TASK_LOSS_PREFIX,
    CIRCUIT_SIZE_PREFIX,
    "circuits/locality/",
    "specialization/concentration/",
)
TASK_PLACEHOLDER = "<task>"
# The task metric of the trade-off plot: the first of these a run has.
TASK_METRICS = (
    metric_names.EVAL_ACCURACY,
    metric_names.EVAL_PERPLEXITY,
    metric_names.EVAL_LOSS,
    metric_names.TASK_LOSS,
)


@dataclass(frozen=True)
class TrialRun:
    variant: str
    seed: int
    run_id: str
    status: str
    metrics: dict[str, float]  # each metric's last logged value


@dataclass(frozen=True)
class Report:
    markdown: str
    tables: dict[str, list[dict]]  # metric -> comparison rows
    trials: list[TrialRun]


def plan_record(
    variants: list[str], controls: dict[str, str | None], seeds: tuple[int, ...], metrics: tuple[str, ...] | None
) -> str:
    """What the parent run keeps of the plan, for the report to be rebuilt from MLflow alone."""
    return json.dumps(
        {
            "variants": variants,
            "controls": controls,
            "seeds": list(seeds),
            "metrics": list(metrics) if metrics else None,
        },
        indent=1,
    )


def read_trials(client, parent_run_id: str) -> list[TrialRun]:
    """The parent run's child runs, ordered by variant name and seed."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )
    trials = [
        TrialRun(
            variant=run.data.tags.get(VARIANT_TAG, "?"),
            seed=int(run.data.tags.get(SEED_TAG, -1)),
            run_id=run.info.run_id,
            status=run.info.status,
            metrics=with_mean_circuit_sizes(dict(run.data.metrics)),
        )
        for run in runs
    ]
    return sorted(trials, key=lambda trial: (trial.variant, trial.seed))


def task_family(metric: str) -> tuple[str, str] | None:
    """A per-task metric's family and task: ``circuits/size/add/tau0.9`` -> (``circuits/size/<task>/tau0.9``,
    ``add``); None for a metric of no task."""
    for prefix in TASK_FAMILY_PREFIXES:
        task, _, rest = metric.removeprefix(prefix).partition("/") if metric.startswith(prefix) else ("", "", "")
        if task:
            return prefix + TASK_PLACEHOLDER + (f"/{rest}" if rest else ""), task
    return None


def compared(metric: str) -> bool:
    """Whether the report compares this metric by default (when a run has it)."""
    return (
        metric in DEFAULT_METRICS
        or metric in SPECIALIZATION_METRICS
        or metric.startswith(MEAN_CIRCUIT_SIZE)
        or task_family(metric) is not None
    )


def with_mean_circuit_sizes(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics with its mean circuit size over the tasks, one per kind of size (the bare size, each τ):
    the paired comparison of one figure per run, where one table per task would leave the answer to the eye."""
    sizes: dict[str, list[float]] = {}
    for key, value in metrics.items():
        family = task_family(key)
        if family is not None and family[0].startswith(CIRCUIT_SIZE_PREFIX):
            kind = family[0].removeprefix(CIRCUIT_SIZE_PREFIX + TASK_PLACEHOLDER)
            sizes.setdefault(MEAN_CIRCUIT_SIZE + kind, []).append(value)
    return metrics | {key: sum(values) / len(values) for key, values in sizes.items()}


def read_plan(client, parent_run_id: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="xcm-report-") as directory:
        path = client.download_artifacts(parent_run_id, PLAN_ARTIFACT, directory)
        return json.loads(Path(path).read_text(encoding="utf-8"))


def chosen_metrics(asked: list[str] | None, trials: list[TrialRun]) -> list[str]:
    """The metrics asked for, else the defaults that some finished run logged, the specialization index and mean
    circuit sizes, then every per-task metric, by family and task."""
    if asked:
        return list(asked)
    present = {key for trial in trials if trial.status == "FINISHED" for key in trial.metrics}
    headline = [key for key in (*DEFAULT_METRICS, *SPECIALIZATION_METRICS) if key in present]
    means = sorted(key for key in present if key.startswith(MEAN_CIRCUIT_SIZE))
    return headline + means + sorted((key for key in present if task_family(key)), key=task_family)


def build_report(client, parent_run_id: str) -> Report:
    plan = read_plan(client, parent_run_id)
    order = {variant: index for index, variant in enumerate(plan["variants"])}
    trials = sorted(read_trials(client, parent_run_id), key=lambda t: (order.get(t.variant, len(order)), t.seed))
    finished = [trial for trial in trials if trial.status == "FINISHED"]
    controls = {variant: plan["controls"].get(variant) for variant in plan["variants"]}
    tables = {}
    for metric in chosen_metrics(plan.get("metrics"), trials):
        values: dict[str, dict[int, float]] = {}
        for trial in finished:
            if metric in trial.metrics:
                values.setdefault(trial.variant, {})[trial.seed] = trial.metrics[metric]
        tables[metric] = comparison_rows(metric, values, controls)
    return Report(markdown=_markdown(parent_run_id, plan, trials, tables), tables=tables, trials=trials)


def write_report(client, parent_run_id: str) -> Report:
    """Build the report and log it into the parent run under ``comparison/``."""
    report = build_report(client, parent_run_id)
    with tempfile.TemporaryDirectory(prefix="xcm-report-") as directory:
        root = Path(directory)
        (root / "comparison.md").write_text(report.markdown, encoding="utf-8")
        _write_tables(root, report)
        _plot_tradeoff(root, report.trials)
        _plot_circuit_sizes(root, report)
        client.log_artifacts(parent_run_id, directory, REPORT_DIRECTORY)
    return report


def _write_tables(root: Path, report: Report) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "tables").mkdir()
    for metric, rows in report.tables.items():
        pq.write_table(pa.Table.from_pylist(rows), root / "tables" / f"{slug(metric)}.parquet")
    long = [
        {"variant": t.variant, "seed": t.seed, "run_id": t.run_id, "status": t.status, "metric": key, "value": value}
        for t in report.trials
        for key, value in sorted(t.metrics.items())
    ]
    schema = pa.schema(
        [
            ("variant", pa.string()),
            ("seed", pa.int64()),
            ("run_id", pa.string()),
            ("status", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(long, schema=schema), root / "trials.parquet")


def slug(metric: str) -> str:
    """A metric name as a file name: ``eval/loss/add`` -> ``eval__loss__add``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric.replace("/", "__"))


NO_VALUE = "-"
TABLE_HEADER = "| variant | n | mean ± sd | control | control mean ± sd | Δ | 95 % interval | pairs |"


def _number(value: float) -> str:
    return NO_VALUE if value is None or not math.isfinite(value) else f"{value:.4g}"


def _mean_sd(mean: float, sd: float) -> str:
    return _number(mean) + ("" if not math.isfinite(sd) else f" ± {_number(sd)}")


def _markdown(parent_run_id: str, plan: dict, trials: list[TrialRun], tables: dict[str, list[dict]]) -> str:
    lines = [
        f"# Comparison of experiment run {parent_run_id}",
        "",
        (
            f"Seeds: {plan['seeds']}. Mean ± sd over the finished seeds; Δ is the variant minus its control, "
            "paired by seed, with its 95 % t-interval."
        ),
        "",
    ]
    if not any(plan["controls"].values()):
        lines += ["No variant has a control (no λ = 0 in the grid): the rows are unpaired.", ""]
    unfinished = [t for t in trials if t.status != "FINISHED"]
    if unfinished:
        lines += [
            "Not counted (did not finish): "
            + ", ".join(f"{t.variant} seed {t.seed} ({t.status}, run {t.run_id})" for t in unfinished),
            "",
        ]
    for title, per_task in _sections(tables):
        if len(per_task) == 1 and per_task[0][0] is None:
            lines += [f"## {title}", "", TABLE_HEADER, "|---|---|---|---|---|---|---|---|"]
            lines += [_row_cells(r) for r in per_task[0][1]]
        else:
            lines += [f"## {title}", "", "| task " + TABLE_HEADER, "|---" * 9 + "|"]
            lines += [f"| {task} " + _row_cells(r) for task, rows in per_task for r in rows]
        lines.append("")
    lines += ["## Trials", "", "| variant | seed | status | run |", "|---|---|---|---|"]
    lines += [f"| {t.variant} | {t.seed} | {t.status} | {t.run_id} |" for t in trials]
    return "\n".join(lines) + "\n"


def _sections(tables: dict[str, list[dict]]) -> list[tuple[str, list[tuple[str | None, list[dict]]]]]:
    """The Markdown's sections in the tables' order: one per metric, except that a family of per-task metrics
    (``circuits/size/<task>``) is one section with a row per task and variant."""
    sections: dict[str, list[tuple[str | None, list[dict]]]] = {}
    for metric, rows in tables.items():
        family = task_family(metric)
        title, task = family if family else (metric, None)
        sections.setdefault(title, []).append((task, rows))
    return list(sections.items())


def _row_cells(r: dict) -> str:
    return (
        f"| {r['variant']} | {r['n']} | {_mean_sd(r['mean'], r['sd'])} | {r['control'] or NO_VALUE} | "
        f"{_mean_sd(r['control_mean'], r['control_sd']) if r['control'] else NO_VALUE} | "
        f"{_number(r['difference'])} | [{_number(r['difference_low'])}, {_number(r['difference_high'])}]"
        f" | {r['pairs']} |"
    )


def _plot_tradeoff(root: Path, trials: list[TrialRun]) -> None:
    """Task metric against clusterability, one point per finished trial, one colour per variant."""
    finished = [t for t in trials if t.status == "FINISHED" and metric_names.CLUSTERABILITY in t.metrics]
    task_metric = next((m for m in TASK_METRICS if any(m in t.metrics for t in finished)), None)
    if task_metric is None:
        return
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for variant in dict.fromkeys(t.variant for t in finished):
        points = [
            (t.metrics[metric_names.CLUSTERABILITY], t.metrics[task_metric])
            for t in finished
            if t.variant == variant and task_metric in t.metrics
        ]
        axes.scatter([x for x, _ in points], [y for _, y in points], label=variant)
    axes.set_xlabel("final clusterability")
    axes.set_ylabel(f"final {task_metric}")
    axes.set_title("task metric against clusterability (one point per seed)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(root / f"tradeoff-{slug(task_metric)}.png", dpi=120)


def _plot_circuit_sizes(root: Path, report: Report) -> None:
    """Mean circuit size per task (± sd over seeds), one bar per variant, one panel per kind of size (the bare
    size, attribution's at each τ: the finders' sizes differ by orders of magnitude), when runs logged them."""
    families: dict[str, list[str]] = {}
    for metric in report.tables:
        family = task_family(metric)
        if family is not None and family[0].startswith(CIRCUIT_SIZE_PREFIX):
            families.setdefault(family[0], []).append(metric)
    if not families:
        return
    from matplotlib.figure import Figure

    widest = max(len(metrics) for metrics in families.values())
    figure = Figure(figsize=(max(6, 1.2 * widest), 4 * len(families)))
    panels = figure.subplots(len(families), 1, squeeze=False)[:, 0]
    for axes, (family, metrics) in zip(panels, families.items(), strict=True):
        _circuit_size_bars(axes, report, metrics)
        kind = family.removeprefix(CIRCUIT_SIZE_PREFIX + TASK_PLACEHOLDER).lstrip("/")
        axes.set_ylabel(f"circuit size {kind}".strip())
    figure.axes[0].set_title("circuit size per task, each variant against the control")
    figure.tight_layout()
    figure.savefig(root / "circuit-size.png", dpi=120)


def _circuit_size_bars(axes, report: Report, metrics: list[str]) -> None:
    variants = [row["variant"] for row in report.tables[metrics[0]]]
    width = 0.8 / max(len(variants), 1)
    for index, variant in enumerate(variants):
        rows = [next(r for r in report.tables[m] if r["variant"] == variant) for m in metrics]
        axes.bar(
            [i + index * width for i in range(len(metrics))],
            [r["mean"] for r in rows],
            width,
            yerr=[0 if not math.isfinite(r["sd"]) else r["sd"] for r in rows],
            label=variant,
        )
    axes.set_xticks(
        [i + width * (len(variants) - 1) / 2 for i in range(len(metrics))],
        [task_family(m)[1] for m in metrics],
        rotation=30,
    )
    axes.legend(fontsize="small")

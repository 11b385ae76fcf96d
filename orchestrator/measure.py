"""``xcm measure``: how modular is a model? Each regularised matrix's clusterability under four partitions.

- ``joint``: xcm's spectral co-clustering, rows and columns in one embedding, so the spectrum pairs them;
- ``separate_label``: the papers' variant, k-means on rows and on columns apart, paired by label number;
- ``separate_mass``: that variant re-paired by the assignment that maximises in-block mass (Hungarian, k x k);
- ``random``: random balanced partitions (the mean of a few draws), the floor of about 1/k.
The papers' "pretrained models are enmeshed" reading is ``separate_label`` near ``random``; the gap to
``separate_mass`` and ``joint`` is how much of it comes from the pairing. Each matrix is measured on its own,
as the papers do (training shares one hidden partition per MLP instead).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchestrator import metric_names

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from orchestrator.train.checkpoint_store import CheckpointState

VARIANTS = ("joint", "separate_label", "separate_mass", "random")
RANDOM_DRAWS = 5
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Measurement:
    matrix: str  # module path, e.g. transformer.h.0.mlp.c_fc
    k: int
    clusterability: dict[str, float]  # variant -> C


def parse_k(text: str) -> list[int]:
    """``4``, ``2..20`` (inclusive) or ``2,4,8`` as a sorted list of cluster counts, each at least 2."""
    span = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", text)
    if span:
        values = list(range(int(span[1]), int(span[2]) + 1))
    elif re.fullmatch(r"[\d,\s]+", text):
        values = [int(part) for part in text.split(",") if part.strip()]
    else:
        values = []
    if not values or min(values) < 2:
        raise ValueError(f"--k {text!r}: give a count >= 2 (4), a range (2..20) or a list (2,4,8)")
    return sorted(set(values))


def load_model(source: str, tracking_uri: str) -> nn.Module:
    """A causal LM from a ``save_pretrained`` directory or a hub name (needs the hub or its cache), or any model
    xcm trains from an xcm checkpoint (a run directory, one of its ``step-*`` checkpoints, either local or a
    storage URI such as ``s3://``, or the MLflow run id that wrote it)."""
    import transformers

    path = Path(source)
    if (path / "config.json").is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    if "://" in source or path.exists() or _RUN_ID.fullmatch(source):
        return _verified_checkpoint_model(source, tracking_uri)
    return transformers.AutoModelForCausalLM.from_pretrained(source)


def _verified_checkpoint_model(source: str, tracking_uri: str) -> nn.Module:
    """Located and verified (signature, then every file's hash) before any of its files is read."""
    from orchestrator.train.export import checkpoint_spec, local_copy
    from orchestrator.train.resume import locate

    located = locate(source, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="xcm-measure-") as scratch:
        local = local_copy(located, Path(scratch))
        return checkpoint_model(local, located.state, checkpoint_spec(local))


def checkpoint_model(local: Path, state: CheckpointState, spec: JobSpec) -> nn.Module:
    """A verified local checkpoint's model: a transformers family's as saved; xcm's own classifiers (the MLP,
    the CNN, the modular-addition transformer), which have no Hugging Face form, as their job builds them,
    with the checkpoint's weights."""
    from orchestrator.circuit_report import fresh_model
    from orchestrator.train import checkpoint_store as store
    from orchestrator.train.export import consolidated_model, consolidated_state_dict

    if (local / store.MODEL_CONFIG).is_file():
        return consolidated_model(local, state)
    model = fresh_model(spec)
    model.load_state_dict(consolidated_state_dict(local, state), strict=True)
    return model


def measure_matrix(weight: torch.Tensor, k: int, seed: int = 0) -> dict[str, float]:
    """C of `weight` `[n_out, n_in]` under each variant's partition into `k` clusters."""
    from orchestrator.modularity import clusterability, cocluster, cocluster_separate, contiguous_labels

    def c(rows: torch.Tensor, cols: torch.Tensor) -> float:
        return float(clusterability(weight, rows, cols, k))

    generator = torch.Generator().manual_seed(seed)
    n_out, n_in = weight.shape

    def shuffled(n: int) -> torch.Tensor:
        return contiguous_labels(n, k)[torch.randperm(n, generator=generator)]

    return {
        "joint": c(*cocluster(weight, k, seed)),
        "separate_label": c(*cocluster_separate(weight, k, seed, pairing="label")),
        "separate_mass": c(*cocluster_separate(weight, k, seed, pairing="mass")),
        "random": sum(c(shuffled(n_out), shuffled(n_in)) for _ in range(RANDOM_DRAWS)) / RANDOM_DRAWS,
    }


def measure_model(
    model: nn.Module, k_values: Sequence[int], matrices: Sequence[str] = ("mlp_in", "mlp_out"), seed: int = 0
) -> list[Measurement]:
    """Every regularised matrix of `model` at every k that fits it (k at most its smaller side)."""
    from orchestrator.modularity import find_matrix_groups

    measurements = []
    with torch.no_grad():
        for group in find_matrix_groups(model, matrices):
            for matrix in group.matrices:
                weight = matrix.weight().detach().float()  # [n_out, n_in]
                for k in k_values:
                    if k <= min(weight.shape):
                        measurements.append(Measurement(matrix.name, k, measure_matrix(weight, k, seed)))
    return measurements


def model_means(measurements: Sequence[Measurement]) -> dict[int, dict[str, float]]:
    """Per k, each variant's mean C over the matrices: the model's figure, as the papers report it."""
    means: dict[int, dict[str, float]] = {}
    for k in sorted({m.k for m in measurements}):
        rows = [m for m in measurements if m.k == k]
        means[k] = {variant: sum(m.clusterability[variant] for m in rows) / len(rows) for variant in VARIANTS}
    return means


def format_table(measurements: Sequence[Measurement]) -> str:
    """A fixed-width table: one row per matrix and k, then the model mean per k."""
    width = max([len("model mean"), *(len(m.matrix) for m in measurements)])
    lines = [f"{'matrix':<{width}}  {'k':>3}" + "".join(f"  {variant:>14}" for variant in VARIANTS)]
    for m in measurements:
        lines.append(f"{m.matrix:<{width}}  {m.k:>3}" + "".join(f"  {m.clusterability[v]:>14.4f}" for v in VARIANTS))
    for k, mean in model_means(measurements).items():
        lines.append(f"{'model mean':<{width}}  {k:>3}" + "".join(f"  {mean[v]:>14.4f}" for v in VARIANTS))
    return "\n".join(lines)


def log_measurements(
    measurements: Sequence[Measurement], source: str, tracking_uri: str, experiment: str, workdir: Path
) -> str:
    """One MLflow run: each C as ``measure/<variant>/<matrix>`` and the model means as ``measure/<variant>``,
    with k as the step (a k sweep plots as a curve), and the table as ``measure.csv``; returns the run id."""
    from mlflow.entities import Metric

    from orchestrator import tracking
    from orchestrator.spec import JobSpec

    store = JobSpec.model_validate({"tracking": {"uri": tracking_uri, "experiment": experiment}}).resolved(workdir)
    name = f"measure-{Path(source).name or source}"
    run_id = tracking.start_run(
        store.tracking, name, {"source": source, "k": ",".join(str(k) for k in sorted({m.k for m in measurements}))}
    )
    mlflow = tracking.client(store.tracking.uri)
    now = int(time.time() * 1000)
    metrics = [
        Metric(metric_names.measured_clusterability(variant, m.matrix), value, now, m.k)
        for m in measurements
        for variant, value in m.clusterability.items()
    ]
    metrics += [
        Metric(metric_names.measured_clusterability(variant), value, now, k)
        for k, mean in model_means(measurements).items()
        for variant, value in mean.items()
    ]
    for start in range(0, len(metrics), 1000):
        mlflow.log_batch(run_id, metrics=metrics[start : start + 1000])
    mlflow.log_text(run_id, _csv(measurements), "measure.csv")
    tracking.end_run(store.tracking.uri, run_id, "FINISHED")
    return run_id


def _csv(measurements: Sequence[Measurement]) -> str:
    rows = ["matrix,k," + ",".join(VARIANTS)]
    rows += [f"{m.matrix},{m.k}," + ",".join(f"{m.clusterability[v]:.6f}" for v in VARIANTS) for m in measurements]
    return "\n".join(rows) + "\n"

"""The comparison's statistics, pure: mean ± sd over seeds, and the paired difference with the control.

A variant and its control trained with the same seed share initialisation, data order and partition seed, so
their difference is paired by seed: the interval of the mean paired difference is narrower than comparing two
means whenever the seeds' effects are shared. The interval is Student's t at 95 %, ``mean ± t(0.975, n−1) ·
sd / √n`` over the n seeds both ran; with fewer than two pairs there is no interval (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
COLUMNS = (
    "metric",
    "variant",
    "n",
    "mean",
    "sd",
    "control",
    "control_n",
    "control_mean",
    "control_sd",
    "pairs",
    "difference",
    "difference_low",
    "difference_high",
)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float  # sample standard deviation (n − 1); NaN for one value


@dataclass(frozen=True)
class PairedDifference:
    pairs: int
    mean: float  # mean of (variant − control) over the seeds both have
    low: float
    high: float


def summarize(values: list[float]) -> Summary:
    """n, mean and sample sd of the finite values (a run that did not log the metric is left out)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return Summary(0, math.nan, math.nan)
    sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return Summary(int(finite.size), float(finite.mean()), sd)


def paired_difference(variant: dict[int, float], control: dict[int, float]) -> PairedDifference:
    """Mean of variant − control over the seeds where both are finite, with its 95 % t-interval."""
    seeds = sorted(
        seed
        for seed in variant.keys() & control.keys()
        if math.isfinite(variant[seed]) and math.isfinite(control[seed])
    )
    differences = np.asarray([variant[seed] - control[seed] for seed in seeds], dtype=np.float64)
    if differences.size == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = float(differences.mean())
    if differences.size < 2:
        return PairedDifference(1, mean, math.nan, math.nan)
    half_width = (
        stats.t.ppf(0.5 + CONFIDENCE / 2, differences.size - 1) * differences.std(ddof=1) / math.sqrt(differences.size)
    )
    return PairedDifference(int(differences.size), mean, mean - float(half_width), mean + float(half_width))


def comparison_rows(metric: str, values: dict[str, dict[int, float]], controls: dict[str, str | None]) -> list[dict]:
    """One row per variant (in ``controls``' order) for one metric: its summary over seeds, its control's beside
    it and the paired difference; a variant without a control (the control itself, or a sweep without λ = 0)
    has empty control columns."""
    rows = []
    for variant, control in controls.items():
        own = values.get(variant, {})
        summary = summarize(list(own.values()))
        row = {
            "metric": metric,
            "variant": variant,
            "n": summary.n,
            "mean": summary.mean,
            "sd": summary.sd,
            "control": control or "",
            "control_n": 0,
            "control_mean": math.nan,
            "control_sd": math.nan,
            "pairs": 0,
            "difference": math.nan,
            "difference_low": math.nan,
            "difference_high": math.nan,
        }
        if control is not None:
            baseline = summarize(list(values.get(control, {}).values()))
            paired = paired_difference(own, values.get(control, {}))
            row.update(
                control_n=baseline.n,
                control_mean=baseline.mean,
                control_sd=baseline.sd,
                pairs=paired.pairs,
                difference=paired.mean,
                difference_low=paired.low,
                difference_high=paired.high,
            )
        rows.append(row)
    return rows

"""The comparison's statistics against values computed by hand."""

import math

import pytest

from orchestrator.experiments.statistics import comparison_rows, paired_difference, summarize

T_975_2_DF = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (tables)
T_975_1_DF = 12.706204736174698


def test_summary_is_mean_and_sample_sd_over_finite_values():
    """0.9, 0.8, 0.7 give mean 0.8 and sd 0.1 (n − 1); a NaN (a run without the metric) is left out."""
    summary = summarize([0.9, 0.8, math.nan, 0.7])
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.8)
    assert summary.sd == pytest.approx(0.1)
    assert math.isnan(summarize([0.5]).sd) and summarize([]).n == 0


def test_paired_difference_pairs_by_seed_with_its_t_interval():
    """Differences 0.4, 0.2, 0.3 (paired by seed, not by order): mean 0.3, sd 0.1, ± t(0.975, 2) · 0.1 / √3."""
    variant = {2: 0.7, 0: 0.9, 1: 0.8}
    control = {0: 0.5, 1: 0.6, 2: 0.4}
    paired = paired_difference(variant, control)
    half = T_975_2_DF * 0.1 / math.sqrt(3)  # 0.248414
    assert paired.pairs == 3
    assert paired.mean == pytest.approx(0.3)
    assert (paired.low, paired.high) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert paired.low == pytest.approx(0.051586, abs=1e-6)


def test_paired_difference_uses_only_the_seeds_both_finished():
    """A control seed that failed drops its pair: 2 pairs, differences 0.4 and 0.2, ± t(0.975, 1) · sd / √2."""
    paired = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.5, 1: 0.6})
    sd = math.sqrt(((0.4 - 0.3) ** 2 + (0.2 - 0.3) ** 2) / 1)
    assert paired.pairs == 2 and paired.mean == pytest.approx(0.3)
    assert paired.high - paired.mean == pytest.approx(T_975_1_DF * sd / math.sqrt(2))
    single = paired_difference({0: 0.9}, {0: 0.5})
    assert single.pairs == 1 and single.mean == pytest.approx(0.4) and math.isnan(single.low)


def test_rows_put_the_control_beside_each_variant():
    """The clustered row carries the control's mean ± sd and the paired difference; the control's row has none."""
    values = {"control": {0: 0.5, 1: 0.6, 2: 0.4}, "clustered": {0: 0.9, 1: 0.8, 2: 0.7}}
    rows = comparison_rows("eval/accuracy", values, {"control": None, "clustered": "control"})
    control, clustered = rows
    assert control["variant"] == "control" and control["control"] == "" and math.isnan(control["difference"])
    assert clustered["control_mean"] == pytest.approx(0.5) and clustered["control_sd"] == pytest.approx(0.1)
    assert clustered["mean"] == pytest.approx(0.8) and clustered["difference"] == pytest.approx(0.3)
    assert clustered["pairs"] == 3 and clustered["n"] == 3 and clustered["control_n"] == 3

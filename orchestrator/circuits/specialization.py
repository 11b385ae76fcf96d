"""The specialization index: how much knowing the task tells you which cluster it depends on.

From a cluster × task damage matrix D (D[i, t]: the share of task t's performance lost when cluster i is
ablated), P(i|t) = D[i, t] / Σ_i D[i, t] with tasks weighted equally, and

    SI = [H(P(i)) − mean_t H(P(·|t))] / log min(k, T)        (normalised mutual information, in [0, 1])

SI is 1 when each task depends on one cluster of its own, and 0 whenever every task has the same damage
profile: uniform damage and "one cluster does everything" alike. The latter is concentration
(Conc_t = 1 − H(P(·|t)) / log k, "task t relies on one cluster"), reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NullModel:
    """SI under random partitions of the same units into clusters of the same sizes."""

    values: np.ndarray  # [draws]
    mean: float
    sd: float
    z: float  # (SI − mean) / sd


@dataclass(frozen=True)
class Dependence:
    """The papers' per-sample statistic over examples the full model gets right: N(x) = how many clusters'
    ablation alone flips x to wrong; `histogram[n-1]` = share of affected examples with N = n (n = 1..k)."""

    correct: int  # examples right under the full model
    affected_share: float  # share of those that some single ablation breaks
    histogram: np.ndarray  # [k]
    per_cluster: np.ndarray  # [k]: share of affected examples that cluster i's ablation breaks
    histogram_se: np.ndarray  # [k], bootstrap over examples
    per_cluster_se: np.ndarray  # [k]


@dataclass(frozen=True)
class Specialization:
    tasks: tuple[str, ...]
    damage: np.ndarray  # [k, T] necessity: share of task t's (full − none) gap lost with cluster i off
    index: float  # SI over the tasks in `used`
    concentration: np.ndarray  # [T]; NaN for tasks not used
    used: np.ndarray  # [T] bool: tasks whose full − none gap is real (and damaged by some cluster)
    sufficiency: np.ndarray | None = None  # [k, T]: share of the gap recovered with only cluster i on
    sufficiency_index: float | None = None
    interval: tuple[float, float] | None = None  # bootstrap 95 % interval of SI over each task's examples
    null: NullModel | None = None
    dependence: Dependence | None = None

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a tracker: the index with its interval and null, sufficiency, concentration per task,
        and the dependence histogram (share of affected examples that N = n clusters break)."""
        values = {"index": self.index} | {
            f"concentration/{task}": float(conc) for task, conc in zip(self.tasks, self.concentration, strict=True)
        }
        if self.sufficiency_index is not None:
            values["sufficiency_index"] = self.sufficiency_index
        if self.interval is not None:
            values["index_ci_low"], values["index_ci_high"] = self.interval
        if self.null is not None:
            values |= {"index_null_mean": self.null.mean, "index_null_sd": self.null.sd, "index_z": self.null.z}
        if self.dependence is not None:
            values["affected_share"] = self.dependence.affected_share
            values |= {f"depends_on/{n}": float(share) for n, share in enumerate(self.dependence.histogram, 1)}
        return values


def entropy(probabilities: np.ndarray, axis: int = -2) -> np.ndarray:
    """Shannon entropy in nats along `axis` (0 log 0 = 0)."""
    logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
    return -(probabilities * logs).sum(axis=axis)


def specialization_index(damage: np.ndarray) -> np.ndarray:
    """SI of `damage` `[..., k, T]` (every column with positive sum); NaN where min(k, T) = 1."""
    k, tasks = damage.shape[-2:]
    if min(k, tasks) < 2:
        return np.full(damage.shape[:-2], np.nan)
    given_task = damage / damage.sum(axis=-2, keepdims=True)  # [..., k, T]: P(i|t)
    marginal = given_task.mean(axis=-1)  # [..., k]: P(i), tasks weighted equally
    mutual = entropy(marginal, axis=-1) - entropy(given_task).mean(axis=-1)
    return np.clip(mutual / np.log(min(k, tasks)), 0.0, 1.0)


def concentration(damage: np.ndarray) -> np.ndarray:
    """Conc_t = 1 − H(P(·|t)) / log k per task `[T]` of `damage` `[k, T]`."""
    given_task = damage / damage.sum(axis=0, keepdims=True)
    return 1.0 - entropy(given_task, axis=0) / np.log(damage.shape[0])


def cluster_specialization(
    damage: np.ndarray,
    tasks: tuple[str, ...] | None = None,
    sufficiency: np.ndarray | None = None,
    used: np.ndarray | None = None,
) -> Specialization:
    """SI, per-task concentration and (given the sufficiency matrix) its SI, from a `[k, T]` damage matrix.
    Tasks with no damage from any cluster, or excluded by `used`, stay out of the index (concentration NaN)."""
    damage = np.asarray(damage, dtype=np.float64)
    if damage.ndim != 2 or (damage < 0).any():
        raise ValueError(
            f"cluster_specialization: damage must be a non-negative [k, T] matrix, got shape {damage.shape}"
        )
    tasks = tuple(tasks) if tasks is not None else tuple(f"task {t}" for t in range(damage.shape[1]))
    used = (np.ones(damage.shape[1], bool) if used is None else np.asarray(used, bool)) & (damage.sum(axis=0) > 0)
    conc = np.full(damage.shape[1], np.nan)
    conc[used] = concentration(damage[:, used])
    suf_index = None
    if sufficiency is not None:
        suf_used = used & (sufficiency.sum(axis=0) > 0)
        suf_index = float(specialization_index(sufficiency[:, suf_used])) if suf_used.any() else float("nan")
    index = float(specialization_index(damage[:, used])) if used.any() else float("nan")
    return Specialization(tasks, damage, index, conc, used, sufficiency, suf_index)

"""The specialization index on damage matrices with known answers, and measured by cluster ablation on planted
networks: specialised, copied and concentrated clusters, relabelling invariance, a calibrated null, and the
per-sample dependence statistic."""

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.circuits import (
    HiddenLayer,
    ablation_specialization,
    cluster_specialization,
    hidden_layers,
    paper_module_labels,
)
from orchestrator.circuits.planted import planted_classifier, planted_examples
from orchestrator.modularity import partition_group

TASKS = {f"class {c}": planted_examples(c, count=100) for c in range(4)}
CLASS_CLUSTERS = torch.arange(4).repeat_interleave(2)  # hidden unit -> its class block


def _noisy_diagonal() -> np.ndarray:
    return np.full((4, 4), 0.05) + np.eye(4) * 0.9


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (np.eye(4), 1.0),
        (np.ones((4, 4)), 0.0),
        (np.tile([[0.9], [0.3], [0.2], [0.1]], (1, 4)), 0.0),
        (_noisy_diagonal(), 0.605),
    ],
)
def test_index_formula_on_known_damage_matrices(damage, expected):
    """Diagonal -> 1, uniform -> 0, one shared profile -> 0, 0.95/0.05 noisy diagonal -> 0.605."""
    assert cluster_specialization(damage).index == pytest.approx(expected, abs=5e-4)


def test_index_is_invariant_to_relabelling_clusters_and_reordering_tasks():
    """Permuting the damage matrix's rows (cluster labels) or columns (task order) leaves SI unchanged."""
    damage = np.random.default_rng(0).uniform(0, 1, (4, 5)) + 2 * np.eye(4, 5)
    index = cluster_specialization(damage).index
    assert 0.05 < index < 1
    for seed in range(3):
        rng = np.random.default_rng(seed)
        shuffled = damage[rng.permutation(4)][:, rng.permutation(5)]
        assert cluster_specialization(shuffled).index == pytest.approx(index, abs=1e-12)


def _specialization(model, labels, **options):
    layer = HiddenLayer("2", labels)  # the hidden layer is the input of the out-projection (module "2")
    return ablation_specialization(model, [layer], TASKS, null_draws=0, bootstraps=200, **options)["2"]


def test_class_clusters_are_fully_specialised():
    """On the block network each class depends on its own cluster only: D diagonal, SI = 1, Conc = 1, and each
    cluster alone suffices for its class (sufficiency SI = 1)."""
    result = _specialization(planted_classifier(), CLASS_CLUSTERS)
    assert np.array_equal(result.damage, np.eye(4))
    assert result.index == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(result.concentration, 1.0)
    assert result.sufficiency_index == pytest.approx(1.0, abs=1e-12)
    assert result.interval == pytest.approx((1.0, 1.0), abs=1e-12)


def test_identical_copies_are_enmeshed_not_specialised():
    """Four identical copies of the whole classifier as the clusters: uniform damage, SI = 0 and Conc = 0."""
    single = planted_classifier()
    model = nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(single[0].weight.repeat(4, 1))
        model[2].weight.copy_(single[2].weight.repeat(1, 4) / 4)
    result = _specialization(model, torch.arange(4).repeat_interleave(8))
    assert result.used.all()
    assert result.index <= 1e-9
    assert np.abs(result.concentration).max() <= 1e-9


def test_one_cluster_doing_everything_is_concentration_not_specialization():
    """Cluster 0 computes every class and the others are zero: SI = 0 while every task's Conc = 1."""
    single = planted_classifier()
    model = nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[2].weight.zero_()
        model[0].weight[:8] = single[0].weight
        model[2].weight[:, :8] = single[2].weight
    result = _specialization(model, torch.arange(4).repeat_interleave(8))
    assert result.index == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(result.concentration, 1.0)


def test_null_from_random_partitions_is_calibrated():
    """With 16 units per class block, random partitions of the same sizes give SI well below the true
    partition's (null mean < 0.3, z > 3)."""
    model = planted_classifier(hidden_per_class=16, out_scale=4 / 16)
    layer = HiddenLayer("2", torch.arange(4).repeat_interleave(16))
    result = ablation_specialization(model, [layer], TASKS, null_draws=20, bootstraps=0)["2"]
    assert result.index == pytest.approx(1.0, abs=1e-12)
    assert result.null.mean < 0.3 and result.null.z > 3


def test_every_affected_example_depends_on_one_cluster():
    """The per-sample statistic: every example broken by some single ablation is broken by exactly one (N = 1),
    and the affected ones are the classes whose logits no longer win (ties go to class 0)."""
    dependence = _specialization(planted_classifier(), CLASS_CLUSTERS).dependence
    assert dependence.correct == 400
    assert dependence.affected_share == pytest.approx(0.75)
    assert np.array_equal(dependence.histogram, [1.0, 0.0, 0.0, 0.0])
    assert np.allclose(dependence.per_cluster, [0, 1 / 3, 1 / 3, 1 / 3])


def test_module_scope_switches_a_cluster_in_every_layer():
    """Module i = cluster i in both hidden layers of a deeper block network: still SI = 1; mean ablation of
    clusters whose units are constant changes nothing, so no task enters the index."""
    single = planted_classifier()
    blocks = (CLASS_CLUSTERS[:, None] == CLASS_CLUSTERS[None, :]).double()
    model = nn.Sequential(single[0], nn.ReLU(), nn.Linear(8, 8, bias=False).double(), nn.ReLU(), single[2])
    with torch.no_grad():
        model[2].weight.copy_(blocks * 0.8)
    layers = [HiddenLayer("2", CLASS_CLUSTERS), HiddenLayer("4", CLASS_CLUSTERS)]
    result = ablation_specialization(model, layers, TASKS, scope="module", null_draws=0, bootstraps=0)
    assert list(result) == ["module"] and result["module"].index == pytest.approx(1.0, abs=1e-12)
    constant = nn.Sequential(nn.Linear(8, 8).double(), nn.ReLU(), nn.Linear(8, 4).double())
    with torch.no_grad():
        constant[0].weight.zero_()
    mean = ablation_specialization(
        constant, [HiddenLayer("2", CLASS_CLUSTERS)], TASKS, mode="mean", null_draws=0, bootstraps=0
    )["2"]
    assert not mean.used.any() and np.isnan(mean.index)


def test_an_index_no_task_enters_has_an_undefined_null_and_z():
    """A hidden layer whose zeroing changes no task's output: the index, its null and its z are all NaN (never an
    infinite z that a tracker would log as a certainty)."""
    with torch.no_grad():
        dead = nn.Sequential(nn.Linear(8, 8).double(), nn.ReLU(), nn.Linear(8, 4).double())
        dead[2].weight.zero_()
    result = ablation_specialization(dead, [HiddenLayer("2", CLASS_CLUSTERS)], TASKS, null_draws=3, bootstraps=0)["2"]
    assert np.isnan(result.index) and np.isnan(result.null.mean) and np.isnan(result.null.z)


def test_hooks_reach_a_transformers_mlp_through_its_out_projection(tiny_gpt2):
    """On GPT-2, the hidden layer of a group partition is c_proj's input: ablating every cluster equals
    zeroing c_proj's weight."""
    mlp = tiny_gpt2.transformer.h[1].mlp
    partition = partition_group([mlp.c_fc.weight.T], [], 4, method="contiguous")
    [layer] = hidden_layers(tiny_gpt2, {"transformer.h.1.mlp": partition})
    assert layer.module == "transformer.h.1.mlp.c_proj"
    tokens = torch.randint(0, 64, (3, 10))
    targets = torch.randint(0, 64, (3,))

    def last_token(model, inputs, answers):
        logits = model(inputs).logits[:, -1]
        return -nn.functional.cross_entropy(logits, answers, reduction="none"), logits.argmax(-1) == answers

    from orchestrator.circuits.ablation import ablate_tasks

    ablation = ablate_tasks(tiny_gpt2, [layer], {"t": (tokens, targets)}, 4, [torch.zeros(256)], last_token)
    saved = mlp.c_proj.weight.detach().clone()
    with torch.no_grad():
        mlp.c_proj.weight.zero_()
        expected = last_token(tiny_gpt2, tokens, targets)[0].numpy()
        mlp.c_proj.weight.copy_(saved)
    assert np.allclose(ablation["t"].none, expected, atol=1e-5)
    assert not np.allclose(ablation["t"].full, expected, atol=1e-3)


def test_paper_modules_are_256_wide_slices_with_the_rest_in_the_last():
    """The papers' GPT-2 modules: 0:256, 256:512, 512:768 and 768:3072 (not the trained 768-wide clusters)."""
    labels = paper_module_labels(3072)
    assert torch.bincount(labels).tolist() == [256, 256, 256, 2304]
    assert labels[767] == 2 and labels[768] == 3
    with pytest.raises(ValueError, match="more than 768"):
        paper_module_labels(512)


def test_specialization_metrics_are_flat_scalars():
    """metrics() gives a tracker the index, its interval, sufficiency, concentration per task and the histogram."""
    metrics = _specialization(planted_classifier(), CLASS_CLUSTERS).metrics()
    assert metrics["index"] == pytest.approx(1.0) and metrics["concentration/class 2"] == pytest.approx(1.0)
    assert metrics["depends_on/1"] == 1.0 and metrics["affected_share"] == pytest.approx(0.75)
    assert {"sufficiency_index", "index_ci_low", "index_ci_high"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())

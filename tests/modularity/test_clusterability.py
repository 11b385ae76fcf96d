"""Clusterability, its baseline and normalised form match their definitions, and the loss has exact gradients."""

import pytest
import torch

from orchestrator.modularity import (
    baseline,
    block_mass,
    clusterability,
    clusterability_loss,
    model_clusterability,
    normalised_clusterability,
)
from orchestrator.modularity.measures import StackedClusterability, onehot


def _small_partitioned_matrix():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    return weight, torch.tensor([0, 2, 1, 1, 0, 2, 2]), torch.tensor([1, 0, 2, 2, 0])


def test_clusterability_equals_brute_force_double_loop():
    """C equals the in-block share of squared mass summed entry by entry."""
    weight, rows, cols = _small_partitioned_matrix()
    inside = sum(weight[u, v] ** 2 for u in range(7) for v in range(5) if rows[u] == cols[v])
    assert float(clusterability(weight, rows, cols)) == pytest.approx(float(inside / weight.pow(2).sum()))


def test_block_mass_equals_brute_force_double_loop():
    """block_mass[i, j] is the squared mass between row cluster i and column cluster j; it sums to the total."""
    weight, rows, cols = _small_partitioned_matrix()
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for u in range(7):
        for v in range(5):
            expected[rows[u], cols[v]] += weight[u, v] ** 2
    assert torch.allclose(block_mass(weight, rows, cols, 3), expected)


def test_baseline_and_normalised_form_match_definition():
    """b counts in-block entries by brute force; (C - b)/(1 - b) is 0 at C = b and 1 at C = 1."""
    _, rows, cols = _small_partitioned_matrix()
    in_block_entries = sum(int(rows[u] == cols[v]) for u in range(7) for v in range(5))
    b = float(baseline(rows, cols, 3))
    assert b == pytest.approx(in_block_entries / 35)
    assert normalised_clusterability(b, b) == 0.0 and normalised_clusterability(1.0, b) == pytest.approx(1.0)


def test_clusterability_ignores_weight_scale():
    """C is a ratio: scaling the weights does not change it, so the loss cannot be gamed by shrinking them."""
    weight, rows, cols = _small_partitioned_matrix()
    assert float(clusterability(0.01 * weight, rows, cols)) == pytest.approx(float(clusterability(weight, rows, cols)))


def test_model_clusterability_gives_mean_and_mass_weighted_mean():
    """A model's C is the plain mean over matrices and the mean weighted by each matrix's squared mass."""
    summary = model_clusterability([torch.tensor(0.2), torch.tensor(0.8)], [torch.tensor(1.0), torch.tensor(3.0)])
    assert float(summary.mean) == pytest.approx(0.5) and float(summary.mass_weighted) == pytest.approx(0.65)


def test_clusterability_loss_passes_gradcheck():
    """-λ mean C over two matrices has analytic gradients that match finite differences (float64)."""
    weight, rows, cols = _small_partitioned_matrix()
    other = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight.requires_grad_(True)
    other.requires_grad_(True)

    def loss(first, second):
        return clusterability_loss([clusterability(first, rows, cols), clusterability(second, cols, rows)], lam=20.0)

    assert torch.autograd.gradcheck(loss, (weight, other))


def test_clusterability_loss_rejects_empty_values():
    """With no recorded values the loss raises instead of silently returning zero."""
    with pytest.raises(ValueError, match="no clusterability values"):
        clusterability_loss([], lam=1.0)


def test_stacked_clusterability_has_the_exact_gradient_and_keeps_no_float32_copy_for_backward():
    """The hand-written backward of C over a stack of matrices matches finite differences (float64) and equals
    C's definition forward; for bf16 weights it keeps only the weights themselves for backward, not a float32
    copy of each matrix (which under ZeRO-3 would materialise every regularised matrix at once)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 9, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3)]
    rows = torch.stack([onehot(torch.randint(0, 3, (6,), generator=generator), 3, torch.float64) for _ in weights])
    cols = torch.stack([onehot(torch.randint(0, 3, (9,), generator=generator), 3, torch.float64) for _ in weights])
    values, totals = StackedClusterability.apply(rows, cols, *weights)
    for index, weight in enumerate(weights):
        expected = clusterability(weight.detach(), rows[index].argmax(1), cols[index].argmax(1), 3)
        assert torch.allclose(values[index], expected) and torch.allclose(totals[index], weight.detach().square().sum())
    assert torch.autograd.gradcheck(lambda *w: StackedClusterability.apply(rows, cols, *w)[0], tuple(weights))

    bf16 = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rows, cols = onehot(torch.arange(64) % 4, 4)[None], onehot(torch.arange(256) % 4, 4)[None]
        value, _ = StackedClusterability.apply(rows, cols, bf16)
    large = [t for t in saved if t.numel() >= bf16.numel()]
    assert value.requires_grad and len(large) == 1 and large[0].data_ptr() == bf16.data_ptr()
    value.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16 and bf16.grad.abs().sum() > 0

"""The attribution circuit finder: integrated-gradient scores recover a planted circuit, its size at each
faithfulness matches the planted size, and a toy language model's task circuit stays inside its cluster."""

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.circuits import (
    HiddenLayer,
    MatrixLabels,
    attribution_weight_circuit,
    cluster_node_attribution,
    top_mask,
)
from orchestrator.circuits.attribution import GRID, integrated_gradient_scores, masked_metric
from orchestrator.circuits.planted import planted_classifier, planted_examples, planted_mask


def cross_entropy(model, batch):
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


@pytest.mark.parametrize("steps", [1, 16])
def test_scores_rank_the_planted_weights_first_and_size_matches(steps):
    """For every label the top 6 weights are the planted ones, and the smallest circuit that matches the full
    model (τ = 1) has 6 of 96 weights; 5 weights already hold 90 % (τ = 0.9), no smaller set holds 100 %."""
    model = planted_classifier()
    for label in range(4):
        batch = planted_examples(label)
        circuit = attribution_weight_circuit(model, [batch], cross_entropy, ig_steps=steps)
        top = top_mask(circuit.scores, 6)
        assert all(torch.equal(top[name], truth) for name, truth in planted_mask(label).items())
        assert circuit.curve[6] >= 1.0 and all(circuit.curve[count] < 1.0 for count in circuit.curve if count < 6)
        assert circuit.size_at[1.0] == 6 / 96 and circuit.size_at[0.9] == 5 / 96
        assert circuit.metrics()["size/tau_1"] == 6 / 96
        assert circuit.masks[1.0]["2.weight"].sum() == 2 and circuit.sizes_at[1.0]["0.weight"] == 4 / 64


def test_faithfulness_curve_and_areas_follow_their_definitions():
    """f on the grid is (m_none − m_q)/(m_none − m_full) of the top-ceil(q·96) circuit, f(1) = 1, and CPR/CMD
    are the trapezoid areas of f and |1 − f|; the model's weights are restored."""
    model = planted_classifier()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = planted_examples(1)
    circuit = attribution_weight_circuit(model, [batch], cross_entropy, ig_steps=4)
    parameters = dict(model.named_parameters())
    for share, value in zip(GRID, circuit.faithfulness, strict=True):
        kept = masked_metric(
            model, parameters, top_mask(circuit.scores, int(np.ceil(share * 96 - 1e-9))), [batch], cross_entropy
        )
        assert value == pytest.approx((circuit.none - kept) / (circuit.none - circuit.full), abs=1e-12)
    assert circuit.faithfulness[-1] == 1.0
    assert circuit.cpr == pytest.approx(np.trapezoid(circuit.faithfulness, GRID))
    assert circuit.cmd == pytest.approx(np.trapezoid(np.abs(1 - circuit.faithfulness), GRID))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert "integrated gradients, K=4" in circuit.method


def test_scores_are_complete():
    """With many steps the scores add up to m(scope zeroed) − m(model) (integrated gradients' completeness)."""
    model = planted_classifier()
    batch = planted_examples(2)
    parameters = dict(model.named_parameters())
    scores = integrated_gradient_scores(model, parameters, [batch], cross_entropy, steps=64)
    zeroed = masked_metric(
        model,
        parameters,
        {n: torch.zeros_like(p, dtype=torch.bool) for n, p in parameters.items()},
        [batch],
        cross_entropy,
    )
    with torch.no_grad():
        full = float(cross_entropy(model, batch))
    assert float(sum(score.sum() for score in scores.values())) == pytest.approx(zeroed - full, rel=1e-3)


def _toy_language_model() -> nn.Sequential:
    """One-hot tokens (vocab 16) -> MLP with 4 clusters of 8 hidden units -> identity unembedding. Task A
    (token x in 0-3 -> 8 + x) runs through cluster 0 only (units 2x, 2x+1), task B (4 + x -> 12 + x) through
    cluster 1; clusters 2-3 read tokens 8-15, which no task's input contains, and write everywhere."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(16, 16),
        nn.Linear(16, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 16, bias=False),
        nn.Linear(16, 16, bias=False),
    ).double()
    w_in, w_out = torch.zeros(32, 16, dtype=torch.float64), torch.zeros(16, 32, dtype=torch.float64)
    for task in range(2):
        for x in range(4):
            units = [8 * task + 2 * x, 8 * task + 2 * x + 1]
            w_in[units, 4 * task + x] = 0.5 + 0.5 * torch.rand(2, generator=generator, dtype=torch.float64)
            w_out[8 + 4 * task + x, units] = 2 + torch.rand(2, generator=generator, dtype=torch.float64)
    w_in[16:, 8:] = torch.rand(16, 8, generator=generator, dtype=torch.float64)
    w_out[:, 16:] = 0.3 * torch.rand(16, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(16))
        model[1].weight.copy_(w_in)
        model[3].weight.copy_(w_out)
        model[4].weight.copy_(torch.eye(16))
    return model


def _toy_task(task: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.arange(4).repeat(8) + 4 * task
    return tokens, tokens + 8


def test_toy_language_model_circuit_stays_in_its_cluster():
    """At τ = 0.9, at least 95 % of task A's kept MLP weights lie in cluster 0's blocks and task B's in
    cluster 1's; cluster-node attribution puts at least 90 % of A's mass on cluster 0."""
    model = _toy_language_model()
    hidden = torch.arange(32) // 8
    residual = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    labels = {"1.weight": MatrixLabels(hidden, residual, 4), "3.weight": MatrixLabels(residual, hidden, 4)}
    for task in range(2):
        circuit = attribution_weight_circuit(
            model, [_toy_task(task)], cross_entropy, params=["1.weight", "3.weight"], partition=labels
        )
        blocks = circuit.locality[0.9].blocks
        kept = sum(float(block.sum()) for block in blocks.values())
        assert sum(float(block[task, task]) for block in blocks.values()) / kept >= 0.95
        assert 0 < circuit.size_at[0.9] < 0.05
    mass = cluster_node_attribution(model, HiddenLayer("3", hidden), [_toy_task(0)], cross_entropy)
    assert float(mass[0].abs() / mass.abs().sum()) >= 0.9


def test_invalid_options_are_refused():
    """τ outside (0, 1], no IG steps, or a scope naming no parameter give one clear error each."""
    model, batch = planted_classifier(), planted_examples(0)
    for options, message in [
        ({"taus": (1.5,)}, "taus"),
        ({"ig_steps": 0}, "ig_steps"),
        ({"params": ["missing.weight"]}, "missing.weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            attribution_weight_circuit(model, [batch], cross_entropy, **options)


def test_language_model_scope_defaults_to_its_mlp_matrices_with_conv1d_orientation(tiny_gpt2):
    """On GPT-2 the default scope is the 4 MLP matrices (c_fc, c_proj of 2 layers; no attention, embeddings or
    unembedding), and locality reads Conv1D masks stored [n_in, n_out] in [n_out, n_in] orientation."""
    from orchestrator.modularity import partition_group

    mlp = tiny_gpt2.transformer.h[0].mlp
    partition = partition_group([mlp.c_fc.weight.T], [mlp.c_proj.weight.T], 2, method="contiguous")
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_gpt2(tokens).logits.log_softmax(-1)

    def divergence(model, batch):  # KL from the full model's next-token distribution: 0 for the full model
        logits = model(batch).logits.log_softmax(-1).flatten(0, 1)
        return nn.functional.kl_div(logits, reference.flatten(0, 1), log_target=True, reduction="batchmean")

    circuit = attribution_weight_circuit(
        tiny_gpt2, [tokens], divergence, ig_steps=2, taus=(0.9,), partition={"transformer.h.0.mlp": partition}
    )
    assert sorted(circuit.scores) == sorted(
        f"transformer.h.{i}.mlp.{m}.weight" for i in range(2) for m in ("c_fc", "c_proj")
    )
    mask = circuit.masks[0.9]["transformer.h.0.mlp.c_fc.weight"]  # [64, 256] = [n_in, n_out]
    hidden, inputs = partition.hidden, partition.inputs[0]
    inside = int((mask & (inputs[:, None] == hidden[None, :])).sum())
    blocks = circuit.locality[0.9].blocks["transformer.h.0.mlp.c_fc.weight"]  # [k, k] rows = hidden clusters
    assert float(torch.diagonal(blocks).sum()) == inside and float(blocks.sum()) == int(mask.sum()) > 0

"""The exact greedy circuit finder on planted networks: the true circuit in any order, the paper criterion's
degenerate circuits, and incremental evaluation equal to evaluating the whole model after every removal."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.circuits import MatrixLabels, greedy_weight_circuit
from orchestrator.circuits.chain import find_linear_chain
from orchestrator.circuits.greedy import rounding
from orchestrator.circuits.planted import (
    planted_attention_classifier,
    planted_attention_examples,
    planted_attention_mask,
    planted_classifier,
    planted_examples,
    planted_mask,
)
from orchestrator.models.modular_addition import ModularAdditionTransformer
from orchestrator.models.vision import CifarCNN, MnistMLP
from orchestrator.modularity import partition_group

LABELS = range(4)


def _kept(circuit) -> int:
    return sum(int(mask.sum()) for mask in circuit.mask.values())


def _kept_of_planted(circuit, label: int) -> int:
    truth = planted_mask(label)
    return sum(int((circuit.mask[name] & truth[name]).sum()) for name in truth)


@pytest.mark.parametrize(("order", "seed"), [("paper", 0), ("ascending", 0), ("random", 0), ("random", 1)])
def test_circuit_is_exactly_the_planted_weights_in_any_order(order, seed):
    """Every label's circuit is its 6 planted weights (size 6/96) whatever the order, and beats the full model."""
    model = planted_classifier()
    for label in LABELS:
        circuit = greedy_weight_circuit(model, *planted_examples(label), order=order, seed=seed)
        assert {name: mask.tolist() for name, mask in circuit.mask.items()} == {
            name: mask.tolist() for name, mask in planted_mask(label).items()
        }
        assert circuit.size == 6 / 96
        assert circuit.task.loss < circuit.full.loss


def test_accuracy_criterion_leaves_the_circuit_unchanged():
    """Adding the accuracy condition (the papers' CIFAR variant) keeps the same 6 weights."""
    model = planted_classifier()
    for label in LABELS:
        circuit = greedy_weight_circuit(model, *planted_examples(label), also_accuracy=True)
        assert _kept(circuit) == _kept_of_planted(circuit, label) == 6


def test_paper_criterion_returns_degenerate_circuits_on_slack():
    """With distractors of 1.0 the paper mode keeps 2 of 6 planted weights for labels 0-2 and nothing at all for
    label 3 (loss log 4 < L0), while the current-loss criterion keeps all 6 for every label."""
    model = planted_classifier(distractor=1.0)
    for label in LABELS:
        examples = planted_examples(label)
        paper = greedy_weight_circuit(model, *examples, reference="original", order="paper")
        sound = greedy_weight_circuit(model, *examples)
        assert _kept(paper) == _kept_of_planted(paper, label) == (0 if label == 3 else 2)
        assert paper.task.loss == pytest.approx(math.log(4), abs=1e-12) and paper.full.loss > math.log(4)
        assert _kept(sound) == _kept_of_planted(sound, label) == 6
    assert paper.size == 0.0


def test_repeated_runs_give_identical_masks():
    """The finder is deterministic: the same inputs give the same masks."""
    model = planted_classifier(distractor=1.0)
    examples = planted_examples(2)
    first, second = (greedy_weight_circuit(model, *examples, order="random", seed=5) for _ in range(2))
    assert all(torch.equal(first.mask[name], second.mask[name]) for name in first.mask)


def _naive_greedy(model: nn.Module, inputs, targets, order: list, reference: str, names=None) -> dict:
    """One full float64 forward per weight: the slow definition the incremental finder must equal."""
    model = model.double().requires_grad_(False)
    parameters = dict(model.named_parameters())

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(inputs), targets))

    full = current = loss()
    for name, unit, source in order:
        weight = parameters[name]
        value = float(weight[unit, source])
        if value == 0:
            continue
        with torch.no_grad():
            weight[unit, source] = 0.0
        trial = loss()
        if trial - (full if reference == "original" else current) > rounding(full, current):
            with torch.no_grad():
                weight[unit, source] = value
        else:
            current = trial
    return {name: parameters[name] != 0 for name in names or ("0.weight", "2.weight", "4.weight")}


@pytest.mark.parametrize("reference", ["current", "original"])
def test_incremental_evaluation_equals_full_forward_per_weight(reference):
    """On a 6-5-5-3 GELU MLP with biases, in random order across layers, the incremental finder keeps exactly
    the weights that full re-evaluation after every removal keeps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, targets = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    circuit = greedy_weight_circuit(model, inputs, targets, reference=reference, order="random", seed=3)
    shapes = {"0.weight": (5, 6), "2.weight": (5, 5), "4.weight": (3, 5)}
    visits = [
        (name, unit, source)
        for name in ("4.weight", "2.weight", "0.weight")
        for unit, source in np.ndindex(*shapes[name])
    ]
    order = [visits[i] for i in np.random.default_rng(3).permutation(len(visits))]
    expected = _naive_greedy(model, inputs, targets, order, reference)
    assert 0 < _kept(circuit) < 85
    assert all(torch.equal(circuit.mask[name], expected[name]) for name in expected)


def test_finder_reads_the_vision_models_fc_chain_and_leaves_the_model_unchanged():
    """xcm's MNIST MLP and CIFAR CNN head are chains fc1..fc4; pruning fc4 does not modify the model."""
    expected = [f"classifier.fc{i}" for i in range(1, 5)]
    assert find_linear_chain(MnistMLP()).names == expected == find_linear_chain(CifarCNN()).names
    torch.manual_seed(0)
    model = CifarCNN()
    before = model.classifier.fc4.weight.clone()
    inputs, targets = torch.randn(20, 3, 32, 32), torch.zeros(20, dtype=torch.long)
    circuit = greedy_weight_circuit(model, inputs, targets, params=["classifier.fc4.weight"])
    assert torch.equal(model.classifier.fc4.weight, before)
    assert 0 < circuit.size < 1 and circuit.task.loss <= circuit.full.loss


def test_unsupported_models_are_refused_with_the_alternative_named():
    """A weight outside every nn.Linear or a model torch.fx cannot trace (a transformers GPT-2) gives one clear
    error naming what the finder prunes or the attribution finder."""
    inputs, targets = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"nn\.Linear layers .* not among them: \['0\.bias'\]"):
        greedy_weight_circuit(nn.Sequential(nn.Linear(4, 3)), inputs, targets, params=["0.bias"])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    with pytest.raises(ValueError, match="use attribution_weight_circuit"):
        greedy_weight_circuit(gpt2, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(("order", "seed"), [("paper", 0), ("ascending", 0), ("random", 0), ("random", 1)])
def test_attention_model_circuit_is_exactly_its_planted_path(order, seed):
    """On the tiny modular-addition transformer that answers its first token through one head, every label's
    circuit is exactly the 5 weights of that path (query, key, value, output, unembedding; 5/360) in any order,
    though every other weight of the attention, its output projection and the MLP is random and non-zero."""
    model = planted_attention_classifier()
    for label in LABELS:
        circuit = greedy_weight_circuit(model, *planted_attention_examples(label), order=order, seed=seed)
        truth = planted_attention_mask(label)
        assert {name: mask.tolist() for name, mask in circuit.mask.items()} == {
            name: mask.tolist() for name, mask in truth.items()
        }
        assert circuit.size == 5 / 360 and circuit.task.accuracy == 1.0


@pytest.mark.parametrize("reference", ["current", "original"])
def test_graph_evaluation_equals_full_forward_per_weight_with_attention(reference):
    """On a random tiny modular-addition transformer (residual stream, causal attention, ReLU MLP), in random
    order across its 7 linear layers, the finder keeps exactly the weights that a full forward after every
    removal keeps."""
    torch.manual_seed(0)
    model = ModularAdditionTransformer(7, d_model=4, n_heads=2, d_mlp=4).double()
    tokens = torch.randint(0, 6, (30, 2))
    inputs, targets = torch.cat([tokens, torch.full((30, 1), 6)], 1), tokens.sum(1) % 6
    circuit = greedy_weight_circuit(model, inputs, targets, reference=reference, order="random", seed=2)
    parameters = dict(model.named_parameters())
    names = list(circuit.mask)
    visits = [(name, unit, source) for name in reversed(names) for unit, source in np.ndindex(*parameters[name].shape)]
    order = [visits[i] for i in np.random.default_rng(2).permutation(len(visits))]
    expected = _naive_greedy(model, inputs, targets, order, reference, names)
    assert 0 < _kept(circuit) < len(visits)
    assert all(torch.equal(circuit.mask[name], expected[name]) for name in expected)


def test_planted_circuit_lies_inside_its_cluster_and_is_scored_on_other_labels():
    """Under the class partition every kept weight is in block (c, c), and label 0's circuit leaves label 1's
    examples at the uniform loss log 4."""
    classes = torch.arange(4).repeat_interleave(2)
    labels = {"0.weight": MatrixLabels(classes, classes, 4), "2.weight": MatrixLabels(torch.arange(4), classes, 4)}
    circuit = greedy_weight_circuit(
        planted_classifier(), *planted_examples(0), partition=labels, other={"label 1": planted_examples(1)}
    )
    assert circuit.locality.share == 1.0
    blocks = circuit.locality.blocks
    assert float(blocks["0.weight"][0, 0]) == 4 and float(blocks["2.weight"][0, 0]) == 2
    assert circuit.other["label 1"].loss == pytest.approx(math.log(4), abs=1e-12)


def test_locality_takes_training_group_partitions():
    """Group partitions keyed by group name (as training holds them) give per-matrix block counts that add up
    to the kept weights, in-block share equal to a direct count."""
    torch.manual_seed(0)
    model = MnistMLP(width=8)
    fc = model.classifier
    partitions = {"classifier.hidden3": partition_group([fc.fc3.weight], [fc.fc4.weight], 2, method="contiguous")}
    inputs, targets = torch.randn(30, 1, 28, 28), torch.zeros(30, dtype=torch.long)
    circuit = greedy_weight_circuit(
        model, inputs, targets, params=["classifier.fc4.weight", "classifier.fc3.weight"], partition=partitions
    )
    partition = partitions["classifier.hidden3"]
    rows = partition.hidden
    inside = circuit.mask["classifier.fc3.weight"] & (rows[:, None] == partition.inputs[0][None, :])
    inside_out = circuit.mask["classifier.fc4.weight"] & (partition.outputs[0][:, None] == rows[None, :])
    expected = (int(inside.sum()) + int(inside_out.sum())) / _kept(circuit)
    assert circuit.locality.share == pytest.approx(expected)
    assert sum(float(b.sum()) for b in circuit.locality.blocks.values()) == _kept(circuit)


def test_confident_model_keeps_its_circuit_where_a_plain_loss_rounds_to_zero():
    """With logit margins near 75 nats (planted logit weights x100) the plain float64 cross-entropy is exactly 0,
    yet every label's circuit is still its 6 planted weights: the finder resolves losses down to ~1e-300."""
    model = planted_classifier(out_scale=100)
    for label in LABELS:
        inputs, targets = planted_examples(label)
        with torch.no_grad():
            assert float(nn.functional.cross_entropy(model(inputs), targets)) == 0.0
        circuit = greedy_weight_circuit(model, inputs, targets)
        assert _kept(circuit) == _kept_of_planted(circuit, label) == 6
        assert 0 < circuit.task.loss < circuit.full.loss


def test_circuit_metrics_are_flat_scalars_of_its_fields():
    """metrics() gives a tracker the circuit's size, scores and locality as plain floats."""
    classes = torch.arange(4).repeat_interleave(2)
    labels = {"0.weight": MatrixLabels(classes, classes, 4), "2.weight": MatrixLabels(torch.arange(4), classes, 4)}
    circuit = greedy_weight_circuit(
        planted_classifier(), *planted_examples(0), partition=labels, other={"label 1": planted_examples(1)}
    )
    metrics = circuit.metrics()
    assert metrics["size"] == 6 / 96 and metrics["size/0.weight"] == 4 / 64 and metrics["locality"] == 1.0
    assert metrics["loss"] == circuit.task.loss and metrics["other/label 1/accuracy"] == 0.0
    assert all(isinstance(value, float) for value in metrics.values())

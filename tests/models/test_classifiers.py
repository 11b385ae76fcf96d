"""xcm's own classifiers: the papers' shapes, their declared clusterability groups, and spec overrides."""

import pytest
import torch

from orchestrator.models import build_model, model_dimensions
from orchestrator.modularity import find_matrix_groups
from orchestrator.spec import ModelSpec


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def test_mnist_mlp_is_784_64_64_64_10_without_bias():
    """The MNIST MLP has exactly four bias-free fc layers of the papers' sizes and maps images to 10 logits."""
    model = build_model(ModelSpec(family="mnist_mlp"), vocab_size=None, seed=0)
    assert list(shapes(model).values()) == [(64, 784), (64, 64), (64, 64), (10, 64)]
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_cifar_cnn_has_one_conv_and_the_fc_stack():
    """The CIFAR CNN is conv 3→16 3x3 without bias, max-pooled to 4096 features, then 4096→64→64→64→10."""
    model = build_model(ModelSpec(family="cifar_cnn"), vocab_size=None, seed=0)
    assert list(shapes(model).values()) == [(16, 3, 3, 3), (64, 4096), (64, 64), (64, 64), (10, 64)]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vision_groups_cover_every_fc_layer_once():
    """The fc layers form two hidden-neuron groups, (fc1, fc2) and (fc3, fc4); the conv is not regularised."""
    model = build_model(ModelSpec(family="cifar_cnn"), vocab_size=None, seed=0)
    groups = find_matrix_groups(model)
    assert [(g.name, [m.name for m in g.inputs], [m.name for m in g.outputs]) for g in groups] == [
        ("classifier.hidden1", ["classifier.fc1"], ["classifier.fc2"]),
        ("classifier.hidden3", ["classifier.fc3"], ["classifier.fc4"]),
    ]


def test_modular_addition_transformer_regularises_mlp_and_attention():
    """The 1-layer transformer (d_model 128, 4 heads, d_mlp 128) declares its MLP and its Q, K, V, O as groups."""
    model = build_model(ModelSpec(family="modular_addition"), vocab_size=114, seed=0)
    assert model(torch.tensor([[3, 5, 113]])).shape == (1, 114)
    groups = {g.name: [m.name for m in g.matrices] for g in find_matrix_groups(model)}
    assert groups == {
        "mlp": ["mlp.w_in", "mlp.w_out"],
        "attention": ["attention.query", "attention.key", "attention.value", "attention.output"],
    }
    mlp_only = build_model(ModelSpec(family="modular_addition", config={"regularise_attention": False}), 114, 0)
    assert [g.name for g in find_matrix_groups(mlp_only)] == ["mlp"]


def test_same_seed_same_weights_and_overrides_apply():
    """Every rank builds identical weights from the seed; model.config overrides sizes; unknown keys are errors."""
    first = build_model(ModelSpec(family="mnist_mlp", config={"width": 32}), None, seed=4)
    second = build_model(ModelSpec(family="mnist_mlp", config={"width": 32}), None, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert first.classifier.fc1.weight.shape == (32, 784)
    assert model_dimensions(ModelSpec(family="mnist_mlp")).intermediate == 10  # k is bounded by the 10 classes
    with pytest.raises(ValueError, match="no key"):
        build_model(ModelSpec(family="mnist_mlp", config={"depth": 3}), None, seed=0)

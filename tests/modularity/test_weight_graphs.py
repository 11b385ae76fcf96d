"""find_matrix_groups finds each family's MLP matrices, in [n_out, n_in] orientation, grouped by hidden neurons."""

import pytest
import torch
from torch import nn

from orchestrator.modularity import find_matrix_groups


def _shapes(groups):
    return [(group.name, [(m.name.split(".")[-1], m.role, m.shape) for m in group.matrices]) for group in groups]


def test_gpt2_groups_are_conv1d_mlps_transposed(tiny_gpt2):
    """GPT-2: c_fc (in) and c_proj (out) per block, flagged transposed, with [n_out, n_in] shapes."""
    groups = find_matrix_groups(tiny_gpt2)
    assert _shapes(groups) == [
        (f"transformer.h.{i}.mlp", [("c_fc", "in", (256, 64)), ("c_proj", "out", (64, 256))]) for i in range(2)
    ]
    c_fc = groups[0].inputs[0]
    assert c_fc.transposed and torch.equal(c_fc.weight(), c_fc.module.weight.T)


def test_gpt_neox_groups():
    """Pythia / GPT-NeoX: dense_h_to_4h (in) and dense_4h_to_h (out) per layer, as nn.Linear."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=256,
            vocab_size=64,
            max_position_embeddings=64,
        )
    )
    assert _shapes(find_matrix_groups(model)) == [
        (f"gpt_neox.layers.{i}.mlp", [("dense_h_to_4h", "in", (256, 64)), ("dense_4h_to_h", "out", (64, 256))])
        for i in range(2)
    ]


def test_gemma_groups_share_hidden_neurons_across_gate_and_up():
    """Gemma: gate_proj and up_proj are both in-projections over the hidden neurons down_proj reads."""
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(
        GemmaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=64,
        )
    )
    groups = find_matrix_groups(model)
    assert _shapes(groups) == [
        (
            f"model.layers.{i}.mlp",
            [("gate_proj", "in", (128, 64)), ("up_proj", "in", (128, 64)), ("down_proj", "out", (64, 128))],
        )
        for i in range(2)
    ]
    assert not any(m.transposed for g in groups for m in g.matrices)


@pytest.mark.parametrize(("matrices", "roles"), [(("mlp_in",), ["in"]), (("mlp_out",), ["out"])])
def test_matrices_selects_in_or_out_projections(tiny_gpt2, matrices, roles):
    """matrices=("mlp_in",) keeps only in-projections, ("mlp_out",) only out-projections."""
    groups = find_matrix_groups(tiny_gpt2, matrices=matrices)
    assert [[m.role for m in g.matrices] for g in groups] == [roles, roles]


def test_unknown_matrix_kind_is_rejected(tiny_gpt2):
    """A kind other than mlp_in / mlp_out raises, naming the allowed kinds."""
    with pytest.raises(ValueError, match="mlp_in"):
        find_matrix_groups(tiny_gpt2, matrices=("attention",))


class _DeclaredModel(nn.Module):
    """A model that is no transformers family and declares its own group (attention-like projections)."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 16)
        self.output = nn.Linear(16, 8)

    def modularity_groups(self):
        return [("block", ["query"], ["output"])]


def test_declared_groups_are_used_as_declared():
    """A model's modularity_groups() decides the groups, module names and roles."""
    assert _shapes(find_matrix_groups(_DeclaredModel())) == [
        ("block", [("query", "in", (16, 8)), ("output", "out", (8, 16))])
    ]


def test_unknown_model_error_names_class_and_fix():
    """A model with no known MLP layout raises, naming its class and the modularity_groups() declaration."""
    with pytest.raises(ValueError, match=r"Sequential.*modularity_groups\(\)"):
        find_matrix_groups(nn.Sequential(nn.Linear(4, 4)))


def test_mismatched_hidden_size_is_rejected():
    """A declared group whose in-projection rows differ from its out-projection columns raises."""
    model = _DeclaredModel()
    model.output = nn.Linear(12, 8)
    with pytest.raises(ValueError, match="hidden size"):
        find_matrix_groups(model)


def test_shape_reads_full_shape_of_a_zero3_partitioned_weight(tiny_gpt2):
    """While ZeRO-3 holds only a shard (an empty weight with ds_shape), shape is still the full [n_out, n_in]."""
    matrix = find_matrix_groups(tiny_gpt2)[0].inputs[0]
    sharded = nn.Parameter(torch.empty(0))
    sharded.ds_shape = matrix.module.weight.shape  # Conv1D storage: [n_in, n_out]
    layer = type(matrix)(matrix.name, nn.Module(), matrix.role, matrix.transposed)
    layer.module.weight = sharded
    assert layer.shape == (256, 64)

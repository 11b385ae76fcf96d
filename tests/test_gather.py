"""The gather side jobs read the weights through: rank 0 gets a float32 copy of what it needs, other ranks None."""

import numpy as np
import torch
import transformers

from orchestrator.gather import Needs, gather
from orchestrator.modularity import find_matrix_groups
from orchestrator.ranks import Rank


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=8, vocab_size=20)
    )


def test_rank_zero_gets_the_groups_and_the_whole_model_it_asks_for():
    """Groups in the regulariser's orientation, every parameter by name, copies that later steps do not move."""
    model = tiny_gpt2()
    groups = find_matrix_groups(model)
    gathered = gather(Needs(groups=True, model=True), model, groups, Rank(0, 2))
    assert set(gathered.groups) == {group.name for group in groups}
    for group in groups:
        snapshot = gathered.groups[group.name]
        assert snapshot.names == tuple(m.name for m in group.matrices)
        for array, matrix in zip(snapshot.weights_in + snapshot.weights_out, group.inputs + group.outputs, strict=True):
            assert np.array_equal(array, matrix.weight().detach().numpy())
    assert set(gathered.model) == {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    assert not np.array_equal(gathered.model["transformer.wte.weight"], model.transformer.wte.weight.detach().numpy())


def test_other_ranks_and_unneeded_parts_get_nothing():
    """Another rank takes part in the gather but keeps no copy; a part not needed is not gathered."""
    model = tiny_gpt2()
    groups = find_matrix_groups(model)
    assert gather(Needs(groups=True, model=True), model, groups, Rank(1, 2)) is None
    gathered = gather(Needs(groups=True), model, groups, Rank(0, 1))
    assert gathered.model is None and gathered.groups

"""The regulariser's forward hooks record C of live weights, in [n_out, n_in] orientation, with gradients."""

import pytest
import torch
from torch import nn

from orchestrator.modularity import (
    ClusterabilityRegulariser,
    clusterability,
    contiguous_labels,
    find_matrix_groups,
    partition_group,
    regularise_groups,
)


def _conv1d_and_linear(tiny_gpt2):
    """GPT-2's first c_fc (Conv1D, stored [64, 256]) and an nn.Linear holding the same map ([256, 64])."""
    conv = tiny_gpt2.transformer.h[0].mlp.c_fc
    linear = nn.Linear(64, 256)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
    return conv, linear


def _partitions(groups) -> dict:
    """Each matrix group's spectral partition into k = 4 clusters (computed in float32, whatever the weights')."""
    return {
        g.name: partition_group([m.weight().float() for m in g.inputs], [m.weight().float() for m in g.outputs], 4)
        for g in groups
    }


def test_conv1d_and_equivalent_linear_give_same_clusterability(tiny_gpt2):
    """A Conv1D and an nn.Linear with the transposed weight measure the same C, via hooks and directly."""
    conv, linear = _conv1d_and_linear(tiny_gpt2)
    rows, cols = contiguous_labels(256, 4), contiguous_labels(64, 4)
    regulariser = ClusterabilityRegulariser()
    regulariser.add("conv", conv, rows, cols, 4, transposed=True)
    regulariser.add("linear", linear, rows, cols, 4)
    with torch.no_grad():
        x = torch.randn(3, 64)
        conv(x), linear(x)
    values = regulariser.values()
    direct = clusterability(conv.weight.T, rows, cols)
    assert torch.allclose(values["conv"], values["linear"]) and torch.allclose(values["conv"], direct)
    regulariser.remove()


def test_model_forward_records_every_group_matrix(tiny_gpt2):
    """One GPT-2 forward records C of every MLP matrix, equal to C computed directly on its [n_out, n_in] weight."""
    groups = find_matrix_groups(tiny_gpt2)
    partitions = _partitions(groups)
    regulariser = ClusterabilityRegulariser()
    regularise_groups(regulariser, groups, partitions)
    with torch.no_grad():
        tiny_gpt2(torch.randint(0, 64, (2, 16)))
    values = regulariser.values()
    for group in groups:
        for matrix, (rows, cols) in zip(group.matrices, partitions[group.name].matrix_labels(), strict=True):
            assert torch.allclose(values[matrix.name], clusterability(matrix.weight(), rows, cols, 4))
    assert len(values) == len(regulariser.masses()) == 4
    regulariser.remove()


def test_non_differentiable_regulariser_reports_the_same_values_without_a_graph(tiny_gpt2):
    """For a lambda-0 run: the same C as the differentiable hooks, while the task loss keeps its own graph."""
    groups = find_matrix_groups(tiny_gpt2)
    partitions = _partitions(groups)
    inputs = torch.randint(0, 64, (2, 16))
    recorded = {}
    for differentiable in (True, False):
        regulariser = ClusterabilityRegulariser(differentiable=differentiable)
        regularise_groups(regulariser, groups, partitions)
        logits = tiny_gpt2(inputs).logits
        recorded[differentiable] = regulariser.values()
        regulariser.remove()
    assert logits.requires_grad
    assert all(value.requires_grad for value in recorded[True].values())
    assert not any(value.requires_grad for value in recorded[False].values())
    assert recorded[True].keys() == recorded[False].keys()
    for name, value in recorded[False].items():
        assert torch.equal(value, recorded[True][name].detach())


def test_penalty_gradient_steps_increase_clusterability():
    """A few Adam steps on the penalty alone raise C of a random matrix well above its starting value."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 48, bias=False)
    rows, cols = contiguous_labels(48, 4), contiguous_labels(32, 4)
    start = float(clusterability(layer.weight.detach(), rows, cols))
    regulariser = ClusterabilityRegulariser()
    regulariser.add("layer", layer, rows, cols, 4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(10):
        regulariser.clear()
        layer(torch.randn(5, 32))
        optimizer.zero_grad()
        regulariser.penalty(20.0).backward()
        optimizer.step()
    assert float(clusterability(layer.weight.detach(), rows, cols)) > start + 0.1


def test_batched_regulariser_matches_the_per_matrix_hooks_in_value_mass_and_gradient(tiny_gpt2):
    """Where weights persist after forward, C is computed lazily for all matrices at once (stacked by shape): the
    same values, masses, penalty and weight gradients as the hooks that compute each matrix as it runs. A second
    forward after C was taken (an activation-checkpoint recompute) changes nothing; with recording off, nothing is
    recorded; non-differentiable, no graph."""
    groups = find_matrix_groups(tiny_gpt2)
    partitions = _partitions(groups)
    inputs = torch.randint(0, 64, (2, 16))
    matrices = [matrix for group in groups for matrix in group.matrices]
    recorded = {}
    for weights_persist in (False, True):
        regulariser = ClusterabilityRegulariser(weights_persist=weights_persist)
        regularise_groups(regulariser, groups, partitions)
        tiny_gpt2.zero_grad()
        tiny_gpt2(inputs)
        penalty = regulariser.penalty(20.0)
        values, masses = regulariser.values(), regulariser.masses()
        tiny_gpt2(inputs)  # a recompute
        assert regulariser.values().keys() == values.keys()
        assert all(torch.equal(regulariser.values()[name], value) for name, value in values.items())
        penalty.backward()
        recorded[weights_persist] = (
            values,
            masses,
            penalty.detach(),
            [matrix.module.weight.grad.clone() for matrix in matrices],
        )
        regulariser.remove()
    (values, masses, penalty, grads), (batched_values, batched_masses, batched_penalty, batched_grads) = (
        recorded[False],
        recorded[True],
    )
    assert len(batched_values) == len(matrices) == 4 and batched_values.keys() == values.keys()
    for name in values:
        assert torch.allclose(batched_values[name], values[name], atol=1e-6)
        assert torch.allclose(batched_masses[name], masses[name], rtol=1e-6)
    assert torch.allclose(batched_penalty, penalty, atol=1e-6)
    for grad, batched_grad in zip(grads, batched_grads, strict=True):
        assert grad.abs().sum() > 0 and torch.allclose(batched_grad, grad, atol=1e-6)

    quiet = ClusterabilityRegulariser(differentiable=False, weights_persist=True)
    regularise_groups(quiet, groups, partitions)
    quiet.recording = False
    tiny_gpt2(inputs)
    assert quiet.values() == {}
    quiet.recording = True
    tiny_gpt2(inputs)
    assert quiet.values().keys() == values.keys()
    assert not any(value.requires_grad for value in quiet.values().values())
    quiet.remove()


def _nodes_named(tensor: torch.Tensor, name: str) -> int:
    """How many nodes of `tensor`'s autograd graph are called `name`."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def test_the_batched_path_bounds_its_stacks_without_changing_values_or_gradients(tiny_gpt2):
    """``stack_elements`` bounds how many weights C's batched path stacks at once (its float32 copies, on a large
    model), which changes the number of stacks and nothing that C computes: tiny GPT-2's four MLP matrices come in
    two stored shapes, so two stacks unbounded or at two matrices' worth, four (one matrix each) below that."""
    groups = find_matrix_groups(tiny_gpt2)
    partitions = _partitions(groups)
    matrices = [matrix for group in groups for matrix in group.matrices]
    size = matrices[0].module.weight.numel()
    inputs = torch.randint(0, 64, (2, 16))
    recorded = {}
    for stack_elements, stacks in ((1 << 25, 2), (2 * size, 2), (size * 3 // 2, 4), (1, 4)):
        regulariser = ClusterabilityRegulariser(weights_persist=True, stack_elements=stack_elements)
        regularise_groups(regulariser, groups, partitions)
        tiny_gpt2.zero_grad()
        tiny_gpt2(inputs)
        penalty = regulariser.penalty(20.0)
        assert _nodes_named(penalty, "StackedClusterabilityBackward") == stacks, stack_elements
        penalty.backward()
        recorded[stack_elements] = (
            penalty.detach(),
            regulariser.masses(),
            [matrix.module.weight.grad.clone() for matrix in matrices],
        )
        regulariser.remove()
    (penalty, masses, grads), *bounded = recorded.values()
    for bounded_penalty, bounded_masses, bounded_grads in bounded:
        assert torch.allclose(bounded_penalty, penalty, atol=1e-6)
        assert all(torch.allclose(bounded_masses[name], mass, rtol=1e-6) for name, mass in masses.items())
        assert all(torch.allclose(bounded, grad, atol=1e-6) for bounded, grad in zip(bounded_grads, grads, strict=True))


@pytest.mark.parametrize("weights_persist", [False, True])
def test_clear_set_partition_and_remove(weights_persist):
    """clear() empties values, set_partition() changes what the hook measures, remove() stops recording."""
    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8))
    regulariser = ClusterabilityRegulariser(weights_persist=weights_persist)
    regulariser.add("layer", layer, torch.arange(8) % 2, torch.arange(8) % 2, 2)
    layer(torch.randn(1, 8))
    assert regulariser.values()["layer"].item() == 1.0
    regulariser.clear()
    assert regulariser.values() == {}
    regulariser.set_partition("layer", torch.arange(8) % 2, (torch.arange(8) + 1) % 2, 2)
    layer(torch.randn(1, 8))
    assert regulariser.values()["layer"].item() == 0.0
    regulariser.remove()
    layer(torch.randn(1, 8))
    assert regulariser.values() == {}
    with pytest.raises(ValueError, match="no clusterability values"):
        regulariser.penalty(1.0)


def test_hook_rejects_labels_of_the_wrong_size():
    """Labels that do not fit the weight's [n_out, n_in] shape raise a ValueError naming the module."""
    layer = nn.Linear(8, 6)
    regulariser = ClusterabilityRegulariser()
    regulariser.add("layer", layer, torch.arange(8) % 2, torch.arange(6) % 2, 2)  # rows and cols swapped
    with pytest.raises(ValueError, match="'layer'"):
        layer(torch.randn(1, 8))


def test_labels_that_do_not_fit_the_weight_are_named_in_n_out_n_in_form(tiny_gpt2):
    """A Conv1D (stored [n_in, n_out]) whose partition has the wrong sizes fails on forward, in [n_out, n_in]
    terms both for the weight and for the labels."""
    conv = tiny_gpt2.transformer.h[0].mlp.c_fc  # [n_out, n_in] = [256, 64]
    regulariser = ClusterabilityRegulariser()
    regulariser.add("conv", conv, contiguous_labels(128, 4), contiguous_labels(64, 4), 4, transposed=True)
    with pytest.raises(ValueError, match=r"\[n_out, n_in\] = \[256, 64\] but its partition labels 128 rows and 64"):
        conv(torch.randn(3, 64))
    regulariser.remove()


@pytest.mark.parametrize("weights_persist", [False, True])
def test_the_loss_keeps_no_copy_of_a_bf16_matrix_for_backward(tiny_gpt2, weights_persist):
    """With bf16 weights, neither the per-matrix hooks (ZeRO-3's path) nor the batched path keeps a matrix-sized
    tensor for backward other than the parameters themselves (a float32 copy each would, under ZeRO-3, hold every
    regularised matrix at once on every rank)."""
    model = tiny_gpt2.to(torch.bfloat16)
    groups = find_matrix_groups(model)
    partitions = _partitions(groups)
    regulariser = ClusterabilityRegulariser(weights_persist=weights_persist)
    regularise_groups(regulariser, groups, partitions)
    parameters = {parameter.data_ptr() for parameter in model.parameters()}
    smallest_matrix = min(matrix.module.weight.numel() for group in groups for matrix in group.matrices)
    copies = []

    def note_copies(saved):
        if saved.numel() >= smallest_matrix and saved.data_ptr() not in parameters:
            copies.append(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(note_copies, lambda saved: saved):
        model(torch.randint(0, 64, (2, 16)))
        penalty = regulariser.penalty(20.0)
    assert not [tuple(copy.shape) for copy in copies]
    penalty.backward()
    assert all(matrix.module.weight.grad.abs().sum() > 0 for group in groups for matrix in group.matrices)

"""A model's last layers as a chain of linear maps with elementwise activations between them.

The exact circuit finder prunes one weight at a time, which is only affordable because zeroing `W[i, j]` of a
chain changes one pre-activation unit, so everything upstream stays cached. The chain is read from the model's
traced graph (torch.fx): walking back from the output, every node must be an `nn.Linear` or an elementwise
activation applied to the node before it; what feeds the first linear layer (a flatten, a conv stack) is
computed once by the model itself. Supported: `nn.Sequential` of Linear and activation modules, and models
whose forward ends in such a chain written with `torch.relu`-style calls (xcm's MNIST MLP, the CIFAR CNN's fc
head). Not supported: residual connections, normalisation, attention, gating (transformers): use attribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)
ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    nn.functional.relu,
    nn.functional.gelu,
    nn.functional.silu,
    nn.functional.leaky_relu,
    nn.functional.elu,
    nn.functional.tanh,
    nn.functional.sigmoid,
}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
UNSUPPORTED = (
    "greedy_weight_circuit supports models that end in a chain of nn.Linear layers with elementwise "
    "activations between them (nn.Sequential MLPs, xcm's mnist_mlp and cifar_cnn head); "
    "use attribution_weight_circuit for other models"
)

Activation = Callable[[np.ndarray], np.ndarray]


@dataclass
class LinearChain:
    """`names[l]` (module paths), `layers[l]` (the nn.Linear modules) and `activations[l]`, applied after layer l
    (the identity after the last). Layer l maps `[N, n_in_l]` to `[N, n_out_l]`."""

    names: list[str]
    layers: list[nn.Linear]
    activations: list[Activation]


def find_linear_chain(model: nn.Module) -> LinearChain:
    """The maximal chain of linear layers ending at the model's output; raises ValueError naming what breaks it."""
    try:
        graph = fx.symbolic_trace(model).graph
    except (fx.proxy.TraceError, TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as error:
        raise ValueError(f"{UNSUPPORTED}: {type(model).__name__} cannot be traced by torch.fx ({error})") from None
    modules = dict(model.named_modules())
    output = next(node for node in graph.nodes if node.op == "output")
    node, pending, chain = _only_input(output), [], LinearChain([], [], [])
    while True:
        activation = _elementwise(node, modules)
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            if pending and not chain.layers:
                raise ValueError(
                    f"{UNSUPPORTED}: {type(model).__name__} applies {node.next.name} to its logits; "
                    "the finder scores the last linear layer's output as logits"
                )
            chain.names.insert(0, node.target)
            chain.layers.insert(0, modules[node.target])
            chain.activations.insert(0, _compose(pending))
            pending = []
        elif activation is not None:
            pending.insert(0, activation)
        else:
            break
        node = _only_input(node)
    if not chain.layers:
        raise ValueError(f"{UNSUPPORTED}: the output of {type(model).__name__} does not come from an nn.Linear")
    return chain


def _only_input(node: fx.Node) -> fx.Node:
    inputs = node.all_input_nodes
    if len(inputs) != 1:
        raise ValueError(f"{UNSUPPORTED}: node {node.name} ({node.op} {node.target}) has {len(inputs)} inputs")
    return inputs[0]


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | None:
    """The node as a numpy activation, or None when it is not elementwise."""
    if node.op == "call_module" and isinstance(modules[node.target], ELEMENTWISE_MODULES):
        module = modules[node.target]
        if isinstance(module, (nn.Identity, nn.Dropout)):  # dropout: the finder judges the model in eval mode
            return _identity
        return _relu if isinstance(module, nn.ReLU) else _through_torch(module)
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        if node.target in (torch.relu, nn.functional.relu):
            return _relu
        extra = node.args[1:]
        return _through_torch(lambda x: node.target(x, *extra, **node.kwargs))
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS and len(node.args) == 1:
        return _relu if node.target == "relu" else _through_torch(getattr(torch, node.target))
    return None


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def _relu(values: np.ndarray) -> np.ndarray:
    return np.maximum(values, 0.0)


def _through_torch(function: Callable[[Tensor], Tensor]) -> Activation:
    return lambda values: function(torch.from_numpy(values)).numpy()


def _compose(activations: list[Activation]) -> Activation:
    if not activations:
        return _identity
    if len(activations) == 1:
        return activations[0]

    def composed(values: np.ndarray) -> np.ndarray:
        for activation in activations:
            values = activation(values)
        return values

    return composed

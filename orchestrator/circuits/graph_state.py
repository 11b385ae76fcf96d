"""Any traceable classifier evaluated in float64 on one task's data with every intermediate value cached, so that
removing one weight of an `nn.Linear` is judged by recomputing only the graph nodes downstream of that layer.

This is what lets the exact finder prune models whose linear layers are not a plain chain: attention heads,
residual streams, embeddings (xcm's modular-addition transformer). Zeroing `W[i, j]` of a linear layer changes its
output only in unit `i`, by `−w·x_j` (last dimension; every position and example); that column is patched into the
cached output and the nodes that depend on it are rerun, in float64, on every example (attention mixes positions,
so the examples a change reaches are not tracked as the chain does). A weight whose input is zero wherever the
layer runs leaves every value, and so the loss, exactly as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

from orchestrator.circuits.chain_state import ChainState

UNTRACEABLE = (
    "greedy_weight_circuit needs a model torch.fx can trace (a forward without data-dependent Python control "
    "flow); use attribution_weight_circuit for {model}"
)


@dataclass
class GraphRemoval:
    """A trial removal of `weights[layer][unit, source]` with the values it changed (the layer's output and
    every node downstream of it) and the per-example loss and correctness it gives."""

    layer: int
    unit: int
    source: int
    values: dict[fx.Node, object]
    example_loss: np.ndarray  # [N]
    example_correct: np.ndarray  # [N]
    loss_change: float


class GraphState:
    """The model's float64 copy, traced; `names[l]` and `weights[l]` (`[n_out, n_in]`, numpy views of the copy's
    parameters, so zeroing one zeroes the model's) for every nn.Linear in the order the forward calls them."""

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor):
        self.model = copy.deepcopy(model).double().cpu().eval().requires_grad_(False)
        try:
            self.graph_module = fx.symbolic_trace(self.model)
        except (fx.proxy.TraceError, TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
            raise ValueError(UNTRACEABLE.format(model=type(model).__name__)) from None
        modules = dict(self.graph_module.named_modules())
        self.nodes = [
            node
            for node in self.graph_module.graph.nodes
            if node.op == "call_module" and isinstance(modules[node.target], nn.Linear)
        ]
        self.names = [node.target for node in self.nodes]
        shared = sorted({name for name in self.names if self.names.count(name) > 1})
        if shared:
            raise ValueError(
                f"greedy_weight_circuit prunes each nn.Linear at one call; {type(model).__name__} calls {shared} "
                "more than once: use attribution_weight_circuit"
            )
        self.weights = [modules[node.target].weight.data.numpy() for node in self.nodes]
        self.biases = [modules[node.target].bias for node in self.nodes]
        self._output = next(node for node in self.graph_module.graph.nodes if node.op == "output").args[0]
        self._downstream = [_downstream_module(self.graph_module, node) for node in self.nodes]
        self.targets = targets.long().cpu().numpy()
        self.values = self._run(inputs.double() if inputs.is_floating_point() else inputs)
        self._check_against(model, inputs)
        self.example_loss, self.example_correct = ChainState.score(self._logits(self.values), self.targets)

    @property
    def loss(self) -> float:
        return float(self.example_loss.mean())

    @property
    def accuracy(self) -> float:
        return float(self.example_correct.mean())

    def try_removal(self, layer: int, unit: int, source: int) -> GraphRemoval:
        """Patch unit `unit` of the layer's cached output and rerun what depends on it."""
        node, downstream = self.nodes[layer], self._downstream[layer]
        layer_input, output = self.values[node.args[0]], self.values[node].clone()
        weight = float(self.weights[layer][unit, source])
        output[..., unit] -= weight * layer_input[..., source]
        self.weights[layer][unit, source] = 0.0  # the layers downstream of this one see the removal too
        if not self.weights[layer][unit].any():  # its last weight: exactly the bias, not a rounding residue
            output[..., unit] = 0.0 if self.biases[layer] is None else float(self.biases[layer][unit])
        try:
            with torch.no_grad():
                computed = downstream.module(output, *(self.values[n] for n in downstream.inputs))
        finally:
            self.weights[layer][unit, source] = weight
        values = dict(zip(downstream.nodes, computed, strict=True)) | {node: output}
        loss, correct = ChainState.score(values[self._output].numpy(), self.targets)
        change = float((loss - self.example_loss).sum() / len(self.targets))
        return GraphRemoval(layer, unit, source, values, loss, correct, change)

    def accuracy_after(self, removal: GraphRemoval) -> float:
        return float(removal.example_correct.mean())

    def commit(self, removal: GraphRemoval) -> None:
        """Make a trial removal the current state."""
        self.weights[removal.layer][removal.unit, removal.source] = 0.0
        self.values |= removal.values
        self.example_loss, self.example_correct = removal.example_loss, removal.example_correct

    def _run(self, *inputs) -> dict[fx.Node, object]:
        """Every node's value."""
        interpreter = fx.Interpreter(self.graph_module, garbage_collect_values=False)
        with torch.no_grad():
            interpreter.run(*inputs)
        return interpreter.env

    def _logits(self, values: dict) -> np.ndarray:
        return values[self._output].numpy()

    def _check_against(self, model: nn.Module, inputs: Tensor) -> None:
        """The traced copy must be a classifier that reproduces the model's own output."""
        logits = self._logits(self.values)
        with torch.no_grad():
            reference = (
                copy.deepcopy(model).double().cpu().eval()(inputs.double() if inputs.is_floating_point() else inputs)
            )
        if logits.ndim != 2:
            raise ValueError(
                f"greedy_weight_circuit needs a classifier with logits [N, classes]; {type(model).__name__} "
                f"gives {tuple(logits.shape)}"
            )
        if not np.allclose(logits, reference.numpy(), rtol=1e-9, atol=1e-9):
            raise ValueError(
                f"the traced graph of {type(model).__name__} does not reproduce its output; "
                "use attribution_weight_circuit"
            )


@dataclass(frozen=True)
class Downstream:
    """What depends on one layer's output, as generated code: `module(layer_output, *values of inputs)` returns
    the values of `nodes` (those computed from the layer's output, in graph order)."""

    module: fx.GraphModule
    inputs: list[fx.Node]  # the cached values it reads besides the layer's output
    nodes: list[fx.Node]


def _downstream_module(root: fx.GraphModule, layer: fx.Node) -> Downstream:
    """The nodes computed from `layer`'s output as one generated forward (a rerun through fx.Interpreter costs
    several times more per removal on a small transformer)."""
    reached = {layer}
    for node in root.graph.nodes:  # graph order is topological
        if node.op != "output" and any(argument in reached for argument in node.all_input_nodes):
            reached.add(node)
    nodes = [node for node in root.graph.nodes if node in reached and node is not layer]
    inputs = list(dict.fromkeys(a for node in nodes for a in node.all_input_nodes if a not in reached))
    graph = fx.Graph()
    copies = {layer: graph.placeholder("layer_output")}
    copies |= {node: graph.placeholder(f"cached_{index}") for index, node in enumerate(inputs)}
    for node in nodes:
        copies[node] = graph.node_copy(node, lambda argument: copies[argument])
    graph.output(tuple(copies[node] for node in nodes))
    return Downstream(fx.GraphModule(root, graph), inputs, nodes)

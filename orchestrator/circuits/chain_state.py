"""A linear chain evaluated in float64 on one task's data, with every layer's input and pre-activation cached,
so that removing one weight is judged by recomputing only what lies downstream of the unit it feeds."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.chain import LinearChain


@dataclass
class Removal:
    """A trial removal of `weights[layer][unit, source]`: the new pre-activation column of `unit`, and the
    recomputed arrays of every later layer (`None` when the removal changes nothing downstream)."""

    layer: int
    unit: int
    source: int
    column: np.ndarray  # [N]: new pre-activation of `unit`
    downstream: list[tuple[np.ndarray, np.ndarray]] | None  # per later layer: (its input [N, n_in], pre [N, n_out])
    loss: float
    accuracy: float


class ChainState:
    """Weights `[n_out, n_in]`, biases, cached inputs `[N, n_in]` and pre-activations `[N, n_out]` per layer."""

    def __init__(self, chain: LinearChain, features: np.ndarray, targets: np.ndarray):
        self.activations = chain.activations
        self.weights = [layer.weight.detach().double().cpu().numpy().copy() for layer in chain.layers]
        self.biases = [None if layer.bias is None else layer.bias.detach().double().cpu().numpy()
                       for layer in chain.layers]
        self.targets = targets
        self.inputs, self.pre = [], []
        values = features
        for layer in range(len(self.weights)):
            self.inputs.append(values)
            self.pre.append(self._linear(layer, values))
            values = self.activations[layer](self.pre[layer])
        self.loss, self.accuracy = self.score(self.pre[-1])

    @classmethod
    def from_model(cls, model: nn.Module, chain: LinearChain, inputs: Tensor, targets: Tensor) -> ChainState:
        """The chain on the model's own features for `inputs` (computed in float64 by a copy of the model),
        checked against the model's output so that a chain read wrongly from the graph cannot go unnoticed."""
        reference = copy.deepcopy(model).double().eval()
        captured = {}
        first = reference.get_submodule(chain.names[0])
        handle = first.register_forward_pre_hook(lambda _module, args: captured.setdefault("x", args[0]))
        try:
            with torch.no_grad():
                output = reference(inputs.double() if inputs.is_floating_point() else inputs)
        finally:
            handle.remove()
        if output.dim() != 2 or captured["x"].dim() != 2:
            raise ValueError(f"greedy_weight_circuit needs a classifier: features [N, n_in] into {chain.names[0]} "
                             f"and logits [N, classes]; got {tuple(captured['x'].shape)} and {tuple(output.shape)}")
        state = cls(chain, captured["x"].numpy(), targets.long().cpu().numpy())
        if not np.allclose(state.pre[-1], output.numpy(), rtol=1e-9, atol=1e-9):
            raise ValueError(f"the chain {chain.names} does not reproduce the output of {type(model).__name__}; "
                             "it has structure between its linear layers that greedy_weight_circuit does not "
                             "model: use attribution_weight_circuit")
        return state

    def _linear(self, layer: int, values: np.ndarray) -> np.ndarray:
        pre = values @ self.weights[layer].T
        return pre if self.biases[layer] is None else pre + self.biases[layer]

    def score(self, logits: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of `logits` `[N, classes]` on the task's targets, in float64."""
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        rows = np.arange(len(self.targets))
        loss = float(np.mean(log_norm - shifted[rows, self.targets]))
        return loss, float(np.mean(logits.argmax(axis=1) == self.targets))

    def try_removal(self, layer: int, unit: int, source: int) -> Removal:
        """Removing `weights[layer][unit, source]` shifts pre-activation `unit` by -w·a_source; only that column
        and the layers after it are recomputed. A removal that changes no activation keeps the loss exactly."""
        weight = self.weights[layer][unit, source]
        column = self.pre[layer][:, unit] - weight * self.inputs[layer][:, source]
        last = len(self.weights) - 1
        if layer == last:
            logits = self.pre[last].copy()
            logits[:, unit] = column
            return Removal(layer, unit, source, column, [], *self.score(logits))
        activation = self.activations[layer](column)
        change = activation - self.inputs[layer + 1][:, unit]
        if not change.any():
            return Removal(layer, unit, source, column, None, self.loss, self.accuracy)
        following = self.inputs[layer + 1].copy()
        following[:, unit] = activation
        pre = self.pre[layer + 1] + np.outer(change, self.weights[layer + 1][:, unit])
        downstream = [(following, pre)]
        for later in range(layer + 2, last + 1):
            values = self.activations[later - 1](pre)
            pre = self._linear(later, values)
            downstream.append((values, pre))
        return Removal(layer, unit, source, column, downstream, *self.score(pre))

    def commit(self, removal: Removal) -> None:
        """Make a trial removal the current state."""
        self.weights[removal.layer][removal.unit, removal.source] = 0.0
        self.pre[removal.layer][:, removal.unit] = removal.column
        for offset, (values, pre) in enumerate(removal.downstream or []):
            self.inputs[removal.layer + 1 + offset] = values
            self.pre[removal.layer + 1 + offset] = pre
        self.loss, self.accuracy = removal.loss, removal.accuracy

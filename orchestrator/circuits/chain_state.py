"""A linear chain evaluated in float64 on one task's data, with every layer's input and pre-activation and
every example's loss cached, so that removing one weight is judged by recomputing only what it changes: the
pre-activation column of the unit it feeds, and the later layers on the examples whose activation moved."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from orchestrator.circuits.chain import LinearChain


@dataclass
class Removal:
    """A trial removal of `weights[layer][unit, source]`: the new pre-activation of `unit` on the examples `rows`
    it changes, and the later layers recomputed on the examples whose activation moved (`moved`)."""

    layer: int
    unit: int
    source: int
    rows: np.ndarray  # [r] examples whose pre-activation of `unit` changes
    column: np.ndarray  # [r] their new pre-activation
    moved: np.ndarray  # [m] examples whose output changes
    downstream: list[tuple[np.ndarray, np.ndarray]]  # per later layer: (its input [m, n_in], pre [m, n_out])
    example_loss: np.ndarray  # [m]
    example_correct: np.ndarray  # [m]
    loss_change: float  # new mean loss − current mean loss, computed on the moved examples only


class ChainState:
    """Weights `[n_out, n_in]`, biases, cached inputs `[N, n_in]`, pre-activations `[N, n_out]` per layer, and
    per-example cross-entropy and correctness."""

    def __init__(self, chain: LinearChain, features: np.ndarray, targets: np.ndarray):
        self.activations = chain.activations
        self.weights = [layer.weight.detach().double().cpu().numpy().copy() for layer in chain.layers]
        self.transposed = [weight.T.copy() for weight in self.weights]  # [n_in, n_out], contiguous for the products
        self.biases = [
            None if layer.bias is None else layer.bias.detach().double().cpu().numpy() for layer in chain.layers
        ]
        self.targets = targets
        self.inputs, self.pre = [], []
        values = features
        for layer in range(len(self.weights)):
            self.inputs.append(values)
            self.pre.append(self._linear(layer, values))
            values = self.activations[layer](self.pre[layer])
        self.example_loss, self.example_correct = self.score(self.pre[-1], targets)

    @property
    def loss(self) -> float:
        return float(self.example_loss.mean())

    @property
    def accuracy(self) -> float:
        return float(self.example_correct.mean())

    @classmethod
    def from_model(cls, model: nn.Module, chain: LinearChain, inputs: Tensor, targets: Tensor) -> ChainState:
        """The chain on the model's own features for `inputs` (computed in float64 by a CPU copy of the model, as
        the search itself is), checked against the model's output so that a chain read wrongly from the graph
        cannot go unnoticed."""
        reference = copy.deepcopy(model).double().cpu().eval()
        captured = {}
        first = reference.get_submodule(chain.names[0])
        handle = first.register_forward_pre_hook(lambda _module, args: captured.setdefault("x", args[0]))
        try:
            with torch.no_grad():
                output = reference(inputs.double() if inputs.is_floating_point() else inputs)
        finally:
            handle.remove()
        if output.dim() != 2 or captured["x"].dim() != 2:
            raise ValueError(
                f"greedy_weight_circuit needs a classifier: features [N, n_in] into {chain.names[0]} "
                f"and logits [N, classes]; got {tuple(captured['x'].shape)} and {tuple(output.shape)}"
            )
        state = cls(chain, captured["x"].numpy(), targets.long().cpu().numpy())
        if not np.allclose(state.pre[-1], output.numpy(), rtol=1e-9, atol=1e-9):
            raise ValueError(
                f"the chain {chain.names} does not reproduce the output of {type(model).__name__}; "
                "it has structure between its linear layers that greedy_weight_circuit does not "
                "model: use attribution_weight_circuit"
            )
        return state

    def _linear(self, layer: int, values: np.ndarray) -> np.ndarray:
        pre = values @ self.transposed[layer]
        return pre if self.biases[layer] is None else pre + self.biases[layer]

    @staticmethod
    def score(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-example cross-entropy `[n]` and correctness of `logits` `[n, classes]`, in float64.

        As log Σ_c exp(z_c − z_target) with the largest term factored out and log1p where the target leads, a
        confident example's loss stays resolved (down to ~1e-300) instead of rounding to 0, so removals that
        change it keep being judged."""
        rows = np.arange(len(targets))
        rivals = logits - logits[rows, targets][:, None]  # [n, classes]: margins of the rivals over the target
        rivals[rows, targets] = -np.inf
        top = np.maximum(rivals.max(axis=1), 0.0)  # [n]: the largest term, the target's 0 included
        rest = np.exp(rivals - top[:, None]).sum(axis=1)  # Σ over rivals, scaled by e^-top
        leads = top == 0
        loss = np.where(leads, np.log1p(np.where(leads, rest, 0.0)), top + np.log(np.exp(-top) + rest))
        return loss, logits.argmax(axis=1) == targets

    def try_removal(self, layer: int, unit: int, source: int) -> Removal:
        """Removing `weights[layer][unit, source]` shifts pre-activation `unit` by −w·a_source on the examples
        where a_source ≠ 0; the later layers are recomputed on the examples whose activation of `unit` moved."""
        rows = np.flatnonzero(self.inputs[layer][:, source])
        column = self.pre[layer][rows, unit] - self.weights[layer][unit, source] * self.inputs[layer][rows, source]
        if np.count_nonzero(self.weights[layer][unit]) == 1:  # its last weight: exactly the bias, no residue
            column[:] = 0.0 if self.biases[layer] is None else self.biases[layer][unit]
        last = len(self.weights) - 1
        if layer == last:
            logits = self.pre[last][rows].copy()
            logits[:, unit] = column
            return self._judged(layer, unit, source, rows, column, rows, [], logits)
        activation = self.activations[layer](column)
        changed = activation != self.inputs[layer + 1][rows, unit]
        moved = rows[changed]
        following = self.inputs[layer + 1][moved].copy()
        following[:, unit] = activation[changed]
        pre = self.pre[layer + 1][moved] + np.outer(
            following[:, unit] - self.inputs[layer + 1][moved, unit], self.transposed[layer + 1][unit]
        )
        downstream = [(following, pre)]
        for later in range(layer + 2, last + 1):
            values = self.activations[later - 1](pre)
            pre = self._linear(later, values)
            downstream.append((values, pre))
        return self._judged(layer, unit, source, rows, column, moved, downstream, pre)

    def _judged(self, layer, unit, source, rows, column, moved, downstream, logits) -> Removal:
        loss, correct = self.score(logits, self.targets[moved])
        change = float((loss - self.example_loss[moved]).sum() / len(self.targets))
        return Removal(layer, unit, source, rows, column, moved, downstream, loss, correct, change)

    def accuracy_after(self, removal: Removal) -> float:
        gained = int(removal.example_correct.sum()) - int(self.example_correct[removal.moved].sum())
        return float((self.example_correct.sum() + gained) / len(self.targets))

    def commit(self, removal: Removal) -> None:
        """Make a trial removal the current state."""
        self.weights[removal.layer][removal.unit, removal.source] = 0.0
        self.transposed[removal.layer][removal.source, removal.unit] = 0.0
        self.pre[removal.layer][removal.rows, removal.unit] = removal.column
        for offset, (values, pre) in enumerate(removal.downstream):
            self.inputs[removal.layer + 1 + offset][removal.moved] = values
            self.pre[removal.layer + 1 + offset][removal.moved] = pre
        self.example_loss[removal.moved] = removal.example_loss
        self.example_correct[removal.moved] = removal.example_correct

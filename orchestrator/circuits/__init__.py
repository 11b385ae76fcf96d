"""Pure math on a model's weights and activations: circuit finders (exact greedy pruning for small models,
attribution-ranked pruning for language models), cluster ablation and the specialization index.

Imports nothing from Ray, DeepSpeed or MLflow, so it can be tested in a second and used from any layer.
"""

from orchestrator.circuits.greedy import Circuit, TaskScore, greedy_weight_circuit
from orchestrator.circuits.locality import Locality, MatrixLabels, circuit_locality, matrix_labels
from orchestrator.circuits.masks import apply_mask, default_scope

__all__ = [
    "Circuit",
    "Locality",
    "MatrixLabels",
    "TaskScore",
    "apply_mask",
    "circuit_locality",
    "default_scope",
    "greedy_weight_circuit",
    "matrix_labels",
]

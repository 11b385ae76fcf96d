"""Pure math on a model's weights and activations: circuit finders (exact greedy pruning for small models,
attribution-ranked pruning for language models), cluster ablation and the specialization index.

Imports nothing from Ray, DeepSpeed or MLflow, so it can be tested in a second and used from any layer.
"""

from orchestrator.circuits.ablation import HiddenLayer, TaskAblation, ablate_tasks, classifier_examples, hidden_layers
from orchestrator.circuits.greedy import Circuit, TaskScore, greedy_weight_circuit
from orchestrator.circuits.locality import Locality, MatrixLabels, circuit_locality, matrix_labels
from orchestrator.circuits.masks import apply_mask, default_scope
from orchestrator.circuits.specialization import (
    Dependence,
    NullModel,
    Specialization,
    cluster_specialization,
    specialization_index,
)
from orchestrator.circuits.task_specialization import ablation_specialization, damage_matrices, dependence

__all__ = [
    "Circuit",
    "Dependence",
    "HiddenLayer",
    "Locality",
    "MatrixLabels",
    "NullModel",
    "Specialization",
    "TaskAblation",
    "TaskScore",
    "ablate_tasks",
    "ablation_specialization",
    "apply_mask",
    "circuit_locality",
    "classifier_examples",
    "cluster_specialization",
    "damage_matrices",
    "default_scope",
    "dependence",
    "greedy_weight_circuit",
    "hidden_layers",
    "matrix_labels",
    "specialization_index",
]

"""Pure math on a model's weights and activations: circuit finders (exact greedy pruning for small models,
attribution-ranked pruning for language models), cluster ablation and the specialization index.

Imports nothing from Ray, DeepSpeed or MLflow, so it can be tested in a second and used from any layer.
"""

from orchestrator.circuits.ablation import (
    HiddenLayer,
    TaskAblation,
    ablate_tasks,
    classifier_examples,
    hidden_layers,
    paper_module_labels,
)
from orchestrator.circuits.attribution import (
    AttributionCircuit,
    attribution_weight_circuit,
    global_threshold,
    integrated_gradient_scores,
    masked_metric,
    top_mask,
)
from orchestrator.circuits.greedy import Circuit, TaskScore, greedy_weight_circuit
from orchestrator.circuits.locality import Locality, MatrixLabels, circuit_locality, matrix_labels
from orchestrator.circuits.masks import apply_mask, default_scope
from orchestrator.circuits.node_attribution import cluster_node_attribution
from orchestrator.circuits.specialization import (
    Dependence,
    NullModel,
    Specialization,
    cluster_specialization,
    specialization_index,
)
from orchestrator.circuits.task_specialization import ablation_specialization, damage_matrices, dependence

__all__ = [
    "AttributionCircuit",
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
    "attribution_weight_circuit",
    "circuit_locality",
    "classifier_examples",
    "cluster_node_attribution",
    "cluster_specialization",
    "damage_matrices",
    "default_scope",
    "dependence",
    "global_threshold",
    "greedy_weight_circuit",
    "hidden_layers",
    "integrated_gradient_scores",
    "masked_metric",
    "matrix_labels",
    "paper_module_labels",
    "specialization_index",
    "top_mask",
]

"""Pure math on weight tensors: weight graphs, co-clustering, clusterability and its loss.

Imports nothing from Ray, DeepSpeed or MLflow, so it can be tested in a second and used from any layer.
"""

from orchestrator.modularity.coclustering import cocluster, cocluster_separate, spectral_embedding
from orchestrator.modularity.k_means import kmeans
from orchestrator.modularity.labels import align_labels, apply_permutation, contiguous_labels
from orchestrator.modularity.loss import ClusterabilityRegulariser, clusterability_loss
from orchestrator.modularity.measures import (
    ModelClusterability,
    baseline,
    block_mass,
    clusterability,
    model_clusterability,
    normalised_clusterability,
)
from orchestrator.modularity.partition import GroupPartition, partition_group, regularise_groups
from orchestrator.modularity.planted import planted_blocks
from orchestrator.modularity.weight_graphs import MatrixGroup, RegularisedMatrix, find_matrix_groups

__all__ = [
    "ClusterabilityRegulariser",
    "GroupPartition",
    "MatrixGroup",
    "ModelClusterability",
    "RegularisedMatrix",
    "align_labels",
    "apply_permutation",
    "baseline",
    "block_mass",
    "clusterability",
    "clusterability_loss",
    "cocluster",
    "cocluster_separate",
    "contiguous_labels",
    "find_matrix_groups",
    "kmeans",
    "model_clusterability",
    "normalised_clusterability",
    "partition_group",
    "planted_blocks",
    "regularise_groups",
    "spectral_embedding",
]

"""Which partition an experiment's circuits side job measures a trial under: a control (lambda 0) is measured under
the spectral co-clustering of its own weights, not the training partition it was never trained to respect."""

from __future__ import annotations

import torch

from orchestrator.circuit_report import (
    CONTROL_PARTITION,
    fresh_partitions,
    loaded_model_from_spec,
    measurement_partitions,
)
from orchestrator.modularity import find_matrix_groups, partition_group
from orchestrator.train.job_checks import load_spec
from tests.helpers import ROOT

MNIST_JOB = ROOT / "jobs" / "mnist_mlp.yaml"


def _contiguous(loaded, k):
    """The fixed contiguous partition jobs/mnist_mlp.yaml trains under, per group."""
    with torch.no_grad():
        return {
            group.name: partition_group(
                [m.weight() for m in group.inputs], [m.weight() for m in group.outputs], k, method="contiguous"
            )
            for group in find_matrix_groups(loaded.model, loaded.matrices)
        }


def _same(first, second) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[n].hidden, second[n].hidden) for n in first)


def test_a_control_is_measured_under_the_spectral_partition_of_its_own_weights():
    """lambda 0: the chosen partition is the spectral co-clustering of the control's weights (not the contiguous
    training partition), and it is labelled as the control's own."""
    spec = load_spec(MNIST_JOB, ["data.source=digits", "modularity.lambda=0"])
    loaded = loaded_model_from_spec(spec)
    training = _contiguous(loaded, spec.modularity.k)

    chosen, label = measurement_partitions(loaded, spec, training)

    assert label == CONTROL_PARTITION
    assert _same(chosen, fresh_partitions(loaded.model, spec.modularity.k, loaded.matrices))
    assert not _same(chosen, training)


def test_a_clustered_model_is_measured_under_the_partition_it_was_trained_to_respect():
    """lambda 20: the chosen partition is the training partition, labelled 'training'."""
    spec = load_spec(MNIST_JOB, ["data.source=digits", "modularity.lambda=20"])
    loaded = loaded_model_from_spec(spec)
    training = _contiguous(loaded, spec.modularity.k)

    chosen, label = measurement_partitions(loaded, spec, training)

    assert label == "training"
    assert _same(chosen, training)

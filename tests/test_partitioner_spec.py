"""The partitioner's section of the job spec."""

import pytest

from orchestrator.spec import SpecError
from orchestrator.train.job_checks import load_spec


def test_more_actors_than_layers_is_a_spec_error(tmp_path):
    """Actors split the MLP layers, so more actors than layers is rejected with the largest useful count."""
    job = tmp_path / "job.yaml"
    job.write_text("partitioner:\n  actors: 3\n")  # the tiny GPT-2 has 2 layers
    with pytest.raises(SpecError) as caught:
        load_spec(job)
    problem = caught.value.problems[0]
    assert problem.key == "partitioner.actors" and problem.line == 2 and "<= 2" in problem.fix


def test_partition_every_and_partitioner_keys_are_validated(tmp_path):
    """Negative schedules and resources are listed together, each by its key."""
    job = tmp_path / "job.yaml"
    job.write_text("modularity:\n  partition_every: -1\npartitioner:\n  cpus: -1\n  heatmap_every: 0\n")
    with pytest.raises(SpecError) as caught:
        load_spec(job)
    assert {p.key for p in caught.value.problems} == {
        "modularity.partition_every",
        "partitioner.cpus",
        "partitioner.heatmap_every",
    }


@pytest.mark.parametrize(
    ("modularity", "problem"),
    [
        ("partition_every: 4", "raise modularity.partition_every"),
        ("partition_every: 0", "partition_every > 0"),
    ],
)
def test_an_adoption_lag_needs_recomputed_partitions_and_at_most_their_period(tmp_path, modularity, problem):
    """A lag beyond partition_every (or with nothing recomputed) is rejected with the key to change."""
    job = tmp_path / "job.yaml"
    job.write_text(f"modularity:\n  {modularity}\npartitioner:\n  adopt_after_steps: 5\n")
    with pytest.raises(SpecError) as caught:
        load_spec(job)
    [found] = caught.value.problems
    assert found.key == "partitioner.adopt_after_steps" and found.line == 4 and problem in found.fix
    assert load_spec(job, ["modularity.partition_every=5"]).partitioner.adopt_after_steps == 5

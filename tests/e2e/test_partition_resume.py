"""Deterministic adoption end to end: with a fixed lag, a run resumed from a checkpoint taken while a partition
was in flight adopts every version at the same step, and trains the same losses, as an uninterrupted run."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train import checkpoint_store as store
from orchestrator.train.launch import run_job
from orchestrator.train.resume import resume_job
from tests.helpers import metric_history, tiny_spec

STEPS = 20
DELAY_S = 1.0  # each version takes at least this long: the request of step 8 is still out at the save after step 9


def tiny(*overrides: str):
    """The default job, 20 steps, a version asked for every 4 steps (0, 4, 8...) and adopted 2 steps later
    (6, 10...), a checkpoint every 10 steps, no evaluation."""
    return tiny_spec(
        f"training.steps={STEPS}",
        "training.report_every=10",
        "checkpointing.every_steps=10",
        "modularity.partition_every=4",
        "partitioner.adopt_after_steps=2",
        f"partitioner.delay_s={DELAY_S}",
        "evaluation.every_steps=0",
        *overrides,
    )


@pytest.mark.slow
def test_resumed_run_adopts_the_same_versions_at_the_same_steps(tmp_path, local_ray):
    """10 steps (the checkpoint holds step 8's version, due at 10), resume to 20: the same partition/version
    steps and the same loss at every step as 20 steps in one go; the first version waited for the actors."""
    reference = run_job(tiny("name=uninterrupted"), tmp_path)
    first = run_job(tiny("name=interrupted", "training.steps=10"), tmp_path)
    pending = json.loads((Path(first.checkpoint_path) / store.PARTITION).read_text())["pending"]
    assert (pending["requested_at"], pending["adopt_at"]) == (8, 10)
    resumed = resume_job(str(Path(first.checkpoint_path).parent), tmp_path, ["training.steps=20"])

    client = MlflowClient(tracking_uri=resumed.tracking_uri)
    versions = metric_history(client, reference.run_id, metric_names.PARTITION_VERSION)
    assert versions == [(0, 1), (6, 2), (10, 3), (14, 4), (18, 5)]
    assert metric_history(client, resumed.run_id, metric_names.PARTITION_VERSION) == versions
    waits = dict(metric_history(client, reference.run_id, metric_names.PARTITION_WAIT_SECONDS))
    assert waits.keys() == {step for step, _ in versions} and waits[0] >= DELAY_S
    expected, got = (metric_history(client, run.run_id, metric_names.LOSS) for run in (reference, resumed))
    assert [step for step, _ in got] == list(range(STEPS))
    for (step, want), (_, have) in zip(expected, got, strict=True):
        assert abs(want - have) <= 1e-6, (step, want, have)

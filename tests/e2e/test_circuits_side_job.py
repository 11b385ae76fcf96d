"""The circuits side job through a real run: Ray Train + DeepSpeed + the circuits actor + MLflow."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import ensure_ray, run_job
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("label_0_1_2_3_4", "label_5_6_7_8_9")
LM_TASKS = ("add", "count")  # the tasks a few steps make depend on the MLP


@pytest.mark.slow
def test_mnist_mlp_logs_circuits_at_every_steps_and_at_the_end(tmp_path, local_ray):
    """The MNIST MLP on digits with circuits every 3 of 6 steps: MLflow has each task's circuit size and the
    specialization index at step indices 2 and 5 (after 3 and 6 steps: the trained weights), and each step's
    damage heatmap, mask tables and table, computed under the training partition."""
    spec = load_spec(
        ROOT / "jobs" / "mnist_mlp.yaml",
        [
            "data.source=digits",
            "training.steps=6",
            "training.report_every=3",
            "evaluation.every_steps=0",
            "circuits.every_steps=3",
            "circuits.tasks=['labels:0+1+2+3+4,5+6+7+8+9']",
            "circuits.max_examples=60",
            "circuits.null_draws=4",
            "circuits.ig_steps=2",
            "circuits.taus=[0.9]",
        ],
    )
    result = run_job(spec, tmp_path)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    for key in (*map(metric_names.circuit_size, TASKS), metric_names.SPECIALIZATION_INDEX):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(point.step for point in history) == [2, 5], key
    sizes = [
        point.value
        for task in TASKS
        for point in client.get_metric_history(result.run_id, metric_names.circuit_size(task))
    ]
    assert all(0 < size <= 1 for size in sizes), sizes
    for step in (2, 5):
        folder = f"circuits/step-{step}"
        names = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/specialization")}
        assert {"damage.png", "damage.parquet"} <= names, names
        greedy = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/circuits/greedy")}
        assert greedy == {f"{task}.parquet" for task in TASKS}
        table = Path(client.download_artifacts(result.run_id, f"{folder}/circuits.txt", str(tmp_path)))
        assert table.read_text().startswith("partition: training (k=4)")


def _circuits_actors() -> list:
    """This test's Ray's circuits actors, as its state API lists them."""
    import ray
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,
        limit=1000,
        filters=[("class_name", "=", "CircuitsActor")],
        detail=True,
    )


def _measurements(*filters: tuple) -> list:
    """This test's Ray's circuits measurements (one entry per attempt), as its state API lists tasks."""
    import ray
    from ray.util.state import list_tasks

    return list_tasks(
        address=ray.get_runtime_context().gcs_address,
        limit=1000,
        filters=[("name", "=", "CircuitsActor.compute"), *filters],
    )


def _computing() -> bool:
    """Whether a circuits measurement is running now."""
    return bool(_measurements(("state", "=", "RUNNING")))


@pytest.mark.slow
def test_tiny_gpt2_logs_attribution_circuits_and_survives_a_killed_circuits_actor(tmp_path, local_ray):
    """The tiny GPT-2 on the synthetic corpus under ZeRO-3 (the actor gets whole matrices gathered from the
    shards) with circuits every 16 of 32 steps: `kill -9` of the circuits actor while it computes the first
    measurement; Ray restarts it and retries the call, and MLflow still has each task's attribution circuit size
    (headline and per tau), concentration and the specialization index at step indices 15 and 31, each step's
    mask tables, and the run FINISHED."""
    spec = tiny_spec(
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",  # every parameter sharded, none kept whole on each rank
        "training.steps=32",
        "training.report_every=16",
        "evaluation.every_steps=0",
        "tracking.log_model=false",
        "circuits.every_steps=16",
        "circuits.method=all",
        f"circuits.tasks=['synthetic:{','.join(LM_TASKS)}']",
        "circuits.max_examples=16",
        "circuits.null_draws=2",
        "circuits.ig_steps=2",
        "circuits.taus=[0.9]",
    ).resolved(tmp_path)
    ensure_ray(spec)  # here, on the main thread, rather than on the job's
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(result=run_job(spec, tmp_path)))
    job.start()
    deadline = time.monotonic() + 600
    while not _computing():  # the run waits for every measurement, so one in progress means the run is live
        assert time.monotonic() < deadline and job.is_alive(), "the circuits actor never started a measurement"
        time.sleep(0.05)
    [actor] = [actor for actor in _circuits_actors() if actor.state == "ALIVE"]
    os.kill(actor.pid, signal.SIGKILL)
    job.join(600)
    result = outcome["result"]
    [restarted] = [entry for entry in _circuits_actors() if entry.actor_id == actor.actor_id]
    assert restarted.num_restarts >= 1 and restarted.pid != actor.pid
    assert max(task.attempt_number for task in _measurements()) >= 1  # the call the kill cut off ran again
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    keys = [
        *(metric_names.circuit_size(task, tau) for task in LM_TASKS for tau in (None, 0.9)),
        *(f"specialization/concentration/{task}" for task in LM_TASKS),
        metric_names.SPECIALIZATION_INDEX,
    ]
    for key in keys:
        history = client.get_metric_history(result.run_id, key)
        assert sorted(point.step for point in history) == [15, 31], key
        assert all(0 <= point.value <= 1 for point in history), (key, history)
    for step in (15, 31):
        folder = f"circuits/step-{step}"
        masks = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/circuits/attribution")}
        assert masks == {f"{task}.parquet" for task in LM_TASKS}, masks

"""Elastic runs end to end on a two-node local Ray: a node lost mid-run (its training worker killed with it), the
run continues on the one worker left from its last checkpoint, grows back to two when a node joins again, and
trains as an undisturbed run does."""

import contextlib
import os
import signal
import statistics
import threading
import time

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train import checkpoint_store as store
from orchestrator.train.launch import _WORKER_ENVIRONMENT, loopback_only_ray, run_job
from tests.helpers import free_port, metric_history, metric_values, tiny_spec

# Long enough that the one worker left is still training when the new node has joined (~10 steps/s here).
STEPS = 400
# The global batch is 8 x 1 x 2 at two workers and 8 x 2 x 1 at one, over the same examples in the same order, so a
# resized run trains as an undisturbed one up to the order of the floating-point sums, which the loss's lambda
# (20) amplifies over hundreds of steps; and a step's logged loss is one micro-batch's, rank 0's, which at one worker
# is another half of the global batch. Compared: the mean loss of each 50 steps (observed apart by up to 0.032).
WINDOW_STEPS = 50
LOSS_TOLERANCE = 0.05
ELASTIC = (
    "resources.num_workers=[1, 2]",
    "resources.grow_check_every_s=2",
    f"training.steps={STEPS}",
    "training.report_every=5",
    "checkpointing.every_steps=10",
    "checkpointing.max_failures=4",
    "training.warmup_steps=8",
    "modularity.partition_at_step=0",
    "evaluation.every_steps=0",
)


def node_args() -> dict:
    """One CPU, on the loopback interface only, small object store."""
    return {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and one more node, each with the CPU of one training worker; the test's own, shut down by it."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # On the loopback interface (as xcm starts its local Ray), and without writing the address to
    # /tmp/ray/ray_current_cluster, where other Ray users on the machine look.
    with loopback_only_ray(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *_: None)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **node_args(),
                "gcs_server_port": free_port(),  # not Ray's default 6379, where another Ray may listen
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
                # A lost node is known as dead within ~1 s, before Ray Train counts the capacity left.
                "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2},
            },
        )
        cluster.add_node(**node_args())
        environment = {
            **_WORKER_ENVIRONMENT,
            "DS_ACCELERATOR": "cpu",
            "RAY_ADDRESS": cluster.address,
            # A group started before the lost node is known as dead waits this long for its second worker.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
        }
        ray.init(address=cluster.address, runtime_env={"env_vars": environment})
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("elastic")


@pytest.fixture(scope="module")
def client(workdir):
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'xcm-runs' / 'mlflow.db'}")


def training_workers(state: str = "ALIVE") -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,
        limit=1000,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)],
    )


def wait_for(condition, what: str, job: threading.Thread, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline and job.is_alive(), f"the run never {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_lost_node_shrinks_the_run_and_a_new_one_grows_it_back(cluster, workdir, client):
    """The worker on the second node killed with its node after a checkpoint: the run continues on 1 worker
    (MLflow's resources/workers reads 1), grows back to 2 when a node joins, ends FINISHED with every step's loss
    logged exactly once and within LOSS_TOLERANCE of an undisturbed run's."""
    started = time.monotonic()
    reference = run_job(tiny_spec(*ELASTIC, "name=undisturbed"), workdir)
    undisturbed_s = time.monotonic() - started
    assert [point.value for point in metric_history(client, reference.run_id, metric_names.WORKERS)] == [2]

    outcome: dict = {}
    job = threading.Thread(
        target=lambda: outcome.update(result=run_job(tiny_spec(*ELASTIC, "name=resized"), workdir)), daemon=True
    )
    job.start()
    started = time.monotonic()
    # Once Ray Train has registered the checkpoint of step 10 (its snapshot lists it), the group restarts from it.
    wait_for(
        lambda: any(
            "step-00000010" in snapshot.read_text()
            for snapshot in workdir.glob("xcm-runs/checkpoints/resized-*/checkpoint_manager_snapshot.json")
        ),
        "registered a checkpoint at step 10",
        job,
    )
    head = cluster.head_node.node_id
    [victim] = [worker for worker in training_workers() if worker.node_id != head]
    [second_node] = list(cluster.worker_nodes)
    cluster.remove_node(second_node, allow_graceful=False)  # its raylet killed: the capacity is gone
    with contextlib.suppress(ProcessLookupError):  # the worker may have ended with its raylet already
        os.kill(victim.pid, signal.SIGKILL)

    [run_directory] = workdir.glob("xcm-runs/checkpoints/resized-*")
    run_id = store.newest_intact(*store.resolve(str(run_directory))).state.run_id

    def newest_written_by_one() -> bool:
        newest = store.newest_intact(*store.resolve(str(run_directory)))
        return newest is not None and newest.state.world_size == 1

    wait_for(lambda: metric_values(client, run_id, metric_names.WORKERS)[-1:] == [1], "continued on 1 worker", job)
    # Grown back before the one worker checkpoints, the group would restart at the same step, where the spool
    # already holds resources/workers (a step's metric is logged once): wait for a checkpoint of its own.
    wait_for(newest_written_by_one, "checkpointed on 1 worker", job)
    joined = time.monotonic()
    cluster.add_node(**node_args())
    joined_s = time.monotonic() - joined
    job.join(600)
    elapsed_s = time.monotonic() - started
    result = outcome["result"]

    workers = metric_history(client, result.run_id, metric_names.WORKERS)
    expected = metric_history(client, reference.run_id, metric_names.LOSS)
    got = metric_history(client, result.run_id, metric_names.LOSS)
    difference = max(
        abs(
            statistics.fmean(value for _, value in got[start : start + WINDOW_STEPS])
            - statistics.fmean(value for _, value in expected[start : start + WINDOW_STEPS])
        )
        for start in range(0, STEPS, WINDOW_STEPS)
    )
    print(
        f"elastic e2e: undisturbed {undisturbed_s:.0f} s, resized {elapsed_s:.0f} s (a node joined in "
        f"{joined_s:.0f} s), workers {workers}, largest {WINDOW_STEPS}-step mean loss difference {difference:.3f}"
    )
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert [point.value for point in workers] == [2, 1, 2], workers  # shrunk, then grown back
    assert metric_history(client, result.run_id, metric_names.RESIZED_FROM) == [
        (workers[1].step, 2),
        (workers[2].step, 1),
    ]
    assert [step for step, _ in got] == list(range(STEPS))  # every step logged exactly once
    assert got[: workers[1].step] == expected[: workers[1].step]  # the same run until the node was lost
    assert difference <= LOSS_TOLERANCE

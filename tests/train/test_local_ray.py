"""The local Ray that xcm starts: its processes find their own instance, whatever `ray start` left on the machine,
and its workers run at the driver's priority while the progress board yields to them."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator import priority

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh process: it starts its own local Ray with its own temporary directory (RAY_TMPDIR), where a
# `ray_current_cluster` file names a GCS that is gone, as a `ray start` cluster killed without `ray stop` leaves.
PROBE = """
import json, os, sys
import ray
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import ensure_ray
from tests.helpers import free_port
from orchestrator.train.progress import ProgressBoard

dead = free_port()  # a port nobody listens on: the dead cluster's GCS
address_file = os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")
os.makedirs(os.path.dirname(address_file), exist_ok=True)
with open(address_file, "w") as file:
    file.write(f"127.0.0.1:{dead}")

@ray.remote(num_cpus=0)
def found_by_a_ray_process():
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return canonicalize_bootstrap_address_or_die(None)  # what Ray's state API connects to

@ray.remote(num_cpus=0)
def environment_of_a_worker():
    names = ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR", "RAY_ADDRESS"]
    return {name: os.environ.get(name) for name in names}, dict(ray.get_runtime_context().runtime_env)

def thread_niceness(_actor=None):
    return sorted({os.getpriority(os.PRIO_PROCESS, int(thread)) for thread in os.listdir("/proc/self/task")})

def listening_sockets():  # (process, address, port) of this driver's and its Ray processes' listening sockets
    import psutil

    sockets = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            sockets |= {(process.name(), connection.laddr.ip, connection.laddr.port)
                        for connection in process.net_connections("inet") if connection.status == psutil.CONN_LISTEN}
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return sorted(sockets)

spec = load_spec(sys.argv[1])
ensure_ray(spec)
try:
    board = ProgressBoard.remote()
    print("RESULT " + json.dumps({
        "own": ray.get_runtime_context().gcs_address,
        "found": ray.get(found_by_a_ray_process.remote(), timeout=60), "dead": dead,
        "environment": ray.get(environment_of_a_worker.remote(), timeout=60),
        "driver environment": [os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")],
        "worker": ray.get(ray.remote(num_cpus=0)(thread_niceness).remote(), timeout=60),
        "progress board": ray.get(board.__ray_call__.remote(thread_niceness), timeout=60),
        "dashboard": ray._private.worker.get_dashboard_url(), "listening": listening_sockets()}))
finally:
    ray.shutdown()
"""


@pytest.fixture(scope="module")
def probed() -> dict:
    # Short: Ray's socket paths under it must stay within the 107 characters of a Unix socket name.
    with tempfile.TemporaryDirectory(prefix="xcm-ray-", dir="/tmp") as ray_tmpdir:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(ROOT / "jobs" / "tiny.yaml")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            env={**os.environ, "RAY_TMPDIR": ray_tmpdir, "PYTHONPATH": str(ROOT)},
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def test_local_ray_processes_ignore_a_stale_ray_start_address(probed):
    """Ray's state API in the instance's processes (Ray Train's placement-group cleaner uses it) reaches that
    instance, not the address a `ray start` left in the temporary directory."""
    assert not probed["found"].endswith(f":{probed['dead']}")
    assert probed["found"].split(":")[1] == probed["own"].split(":")[1]


def test_local_ray_workers_inherit_their_variables_without_a_runtime_env(probed):
    """A worker of the local Ray has the job's variables (Ray Train's poll interval, DeepSpeed's accelerator, its
    instance's address) from the environment it inherits, under an empty runtime_env: Ray starts it directly, not
    through the extra Python of a runtime_env's setup; the driver's own environment is left as it was."""
    variables, runtime_env = probed["environment"]
    assert variables == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "RAY_ADDRESS": probed["own"],
    }
    assert runtime_env == {}
    assert probed["driver environment"] == [None, None]


def test_workers_run_at_the_driver_priority_and_the_progress_board_below_it(probed):
    """A worker process (where a training rank runs) has every thread at niceness 0, not Ray's default 15 below
    its daemons; the progress board, which rank 0 posts to at every step, has every thread at 15 or more."""
    assert probed["worker"] == [priority.WORKER_NICENESS] == [os.getpriority(os.PRIO_PROCESS, 0)]
    assert min(probed["progress board"]) >= priority.HELPER_NICENESS, probed["progress board"]


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_local_ray_listens_on_the_loopback_interface_only(probed):
    """Every socket the local Ray listens on (GCS, raylet, object manager, dashboard and Jobs API, agents, workers)
    is bound to the loopback interface, none to 0.0.0.0, :: or the machine's address: no one on the network can
    reach it."""
    ports = {port for _, _, port in probed["listening"]}
    gcs_port, dashboard_port = (int(address.rsplit(":", 1)[1]) for address in (probed["own"], probed["dashboard"]))
    assert {gcs_port, dashboard_port} <= ports
    assert [socket for socket in probed["listening"] if socket[1] not in LOOPBACK] == []

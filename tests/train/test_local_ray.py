"""The local Ray that xcm starts: its processes find their own instance, whatever `ray start` left on the machine."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh process: it starts its own local Ray with its own temporary directory (RAY_TMPDIR), where a
# `ray_current_cluster` file names a GCS that is gone, as a `ray start` cluster killed without `ray stop` leaves.
PROBE = """
import json, os, sys
import ray
from orchestrator.spec import load_spec
from orchestrator.train.launch import ensure_ray, free_port

dead = free_port()  # a port nobody listens on: the dead cluster's GCS
address_file = os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")
os.makedirs(os.path.dirname(address_file), exist_ok=True)
with open(address_file, "w") as file:
    file.write(f"127.0.0.1:{dead}")

@ray.remote(num_cpus=0)
def found_by_a_ray_process():
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return canonicalize_bootstrap_address_or_die(None)  # what Ray's state API connects to

ensure_ray(load_spec(sys.argv[1]))
try:
    print("RESULT " + json.dumps({"own": ray.get_runtime_context().gcs_address,
                                  "found": ray.get(found_by_a_ray_process.remote(), timeout=60), "dead": dead}))
finally:
    ray.shutdown()
"""


def test_local_ray_processes_ignore_a_stale_ray_start_address():
    """Ray's state API in the instance's processes (Ray Train's placement-group cleaner uses it) reaches that
    instance, not the address a `ray start` left in the temporary directory."""
    # Short: Ray's socket paths under it must stay within the 107 characters of a Unix socket name.
    with tempfile.TemporaryDirectory(prefix="xcm-ray-", dir="/tmp") as ray_tmpdir:
        done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "jobs" / "tiny.yaml")], cwd=ROOT,
                              capture_output=True, text=True, timeout=240,
                              env={**os.environ, "RAY_TMPDIR": ray_tmpdir, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert not result["found"].endswith(f":{result['dead']}")
    assert result["found"].split(":")[1] == result["own"].split(":")[1]

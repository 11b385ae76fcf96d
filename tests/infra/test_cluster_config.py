"""cluster.yaml passes Ray's own cluster-launcher validation, offline, and agrees with the rest of infra/.

Ray validates a config in two offline steps before it talks to the cloud (``ray up`` → ``_bootstrap_config``):
``prepare_config`` merges the provider's defaults and checks the Docker section, then ``validate_config`` checks
the result against Ray's JSON schema (``ray/autoscaler/ray-schema.json``) and the head/worker consistency rules.
The remaining steps (filling node resources from EC2, creating IAM roles and key pairs) need AWS credentials.
"""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
RAYCLUSTER = yaml.safe_load((ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())


def ray_validated(config: dict) -> dict:
    """The config as `ray up` would use it, after Ray's offline validation (raises on an invalid config)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict:
    return ray_validated(CLUSTER)


def test_cluster_yaml_passes_ray_validation(prepared):
    """Ray's prepare_config and validate_config accept cluster.yaml and keep its head and GPU node types."""
    assert prepared["cluster_name"] == "xcm"
    assert set(prepared["available_node_types"]) == {prepared["head_node_type"], "gpu"}


def break_unknown_top_level_key(config):
    config["max_worker"] = 4


def break_missing_head_node_type(config):
    del config["head_node_type"]  # Ray then falls back to its AWS default, ray.head.default, which is not defined


def break_head_node_type_not_defined(config):
    config["head_node_type"] = "head-node"


def break_gpu_count_as_text(config):
    config["available_node_types"]["gpu"]["resources"]["GPU"] = "4"


def break_unknown_docker_option(config):
    config["docker"]["run_option"] = ["--ipc=host"]


def break_min_workers_above_cluster_max(config):
    config["available_node_types"]["gpu"]["min_workers"] = config["max_workers"] + 1


BROKEN_COPIES = [
    (break_unknown_top_level_key, "'max_worker' was unexpected"),
    (break_missing_head_node_type, "`head_node_type` must be one of `available_node_types`"),
    (break_head_node_type_not_defined, "`head_node_type` must be one of `available_node_types`"),
    (break_gpu_count_as_text, "'4' is not of type 'integer'"),
    (break_unknown_docker_option, "'run_option' was unexpected"),
    (break_min_workers_above_cluster_max, "smaller than the sum of `min_workers`"),
]


@pytest.mark.parametrize(
    ("break_config", "message"),
    [
        pytest.param(function, message, id=function.__name__.removeprefix("break_"))
        for function, message in BROKEN_COPIES
    ],
)
def test_a_broken_copy_fails_ray_validation(break_config, message):
    """Each kind of mistake in a copy of cluster.yaml is rejected by Ray's validation (so the check can fail)."""
    broken = copy.deepcopy(CLUSTER)
    break_config(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_validated(broken)


def test_head_trains_nothing_and_workers_bring_gpus(prepared):
    """The head advertises no CPU and no GPU (it only drives the job); the GPU type autoscales from zero."""
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    gpu = node_types["gpu"]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= gpu["resources"]["GPU"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]


def test_head_serves_the_jobs_api_on_all_interfaces_at_8265(prepared):
    """The head's `ray start` opens the dashboard (and with it the Jobs API) on 0.0.0.0:8265."""
    start = shlex.split(" ".join(prepared["head_start_ray_commands"]).replace(";", " ; "))
    assert "--head" in start and "--dashboard-host=0.0.0.0" in start and "--dashboard-port=8265" in start
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_every_node_gets_tracking_uri_token_auth_and_the_token(prepared):
    """The container sets MLFLOW_TRACKING_URI and RAY_AUTH_MODE=token, and ~/.ray (the token) is mounted."""
    run_options = " ".join(prepared["docker"]["run_options"])
    assert "--env MLFLOW_TRACKING_URI=http://" in run_options
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert prepared["file_mounts"]["/home/ray/.ray"] == "~/.ray"


def test_setup_installs_the_mounted_checkout_with_the_pinned_requirements(prepared):
    """setup_commands install xcm from the mounted checkout, with a requirements file that exists in the repo."""
    mount, local = "/home/ray/xcm", prepared["file_mounts"]["/home/ray/xcm"]
    assert local == "."
    command = shlex.split(" ".join(prepared["setup_commands"]))
    requirements = command[command.index("-r") + 1]
    assert (ROOT / Path(requirements).relative_to(mount)).is_file()
    assert command[command.index("-e") + 1] == mount


def test_cluster_runs_the_same_image_as_kuberay(prepared):
    """cluster.yaml and the KubeRay cluster run one image, tagged with xcm's version."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = prepared["docker"]["image"]
    assert image.endswith(f":{version}")
    head_container = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head_container["image"] == image


def test_every_node_gets_your_checkpoint_key_and_mlflow_credentials(prepared):
    """Your checkpoint key file and MLflow credentials file are mounted into the container's home where xcm and
    MLflow look for them, so every node signs with one key and signs in to the MLflow server."""
    from mlflow.utils.credentials import _get_credentials_path

    from orchestrator.train.checkpoint_store import key_file

    home, mounts = Path.home(), prepared["file_mounts"]
    for looked_up in (key_file(), Path(_get_credentials_path())):
        directory = looked_up.parent.relative_to(home).as_posix()
        assert mounts[f"/home/ray/{directory}"] == f"~/{directory}"

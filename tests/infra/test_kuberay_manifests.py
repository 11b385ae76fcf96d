"""The KubeRay manifests: valid Kubernetes pods, read by Ray's autoscaler as intended, running a valid xcm job.

No package on PyPI ships KubeRay's CRD schema, so the RayCluster and RayJob are checked in two parts: every pod
template against the official Kubernetes schema (kubernetes-validate, strict: unknown fields fail), and the whole
custom resource through the code Ray's autoscaler itself uses to read a RayCluster (which then runs Ray's own
config validation on the result).
"""

import copy
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "infra" / "kuberay"
RAYCLUSTER = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
RAYJOB = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
SHARED_STORAGE = yaml.safe_load((KUBERAY / "shared-storage.yaml").read_text())
KUBERNETES_VERSION = "1.33"  # the oldest minor still in standard support on EKS and GKE when this was written


def group_specs(cluster_spec: dict) -> dict[str, dict]:
    """Head and worker groups of a RayCluster spec, by name."""
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in cluster_spec["workerGroupSpecs"]})
    return groups


def as_pod_template(group: dict) -> dict:
    """A group's pod template as the core Kubernetes object it is (v1 PodTemplate), for schema validation."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "xcm"}, "template": group["template"]}


def containers(cluster_spec: dict) -> list[dict]:
    return [container for group in group_specs(cluster_spec).values()
            for container in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("group", sorted(group_specs(RAYCLUSTER["spec"])))
def test_pod_templates_are_valid_kubernetes(group):
    """Each group's pod template passes the strict Kubernetes schema (unknown or mistyped fields fail)."""
    template = as_pod_template(group_specs(RAYCLUSTER["spec"])[group])
    kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)


def test_shared_volume_claim_is_valid_kubernetes():
    """The shared volume's PersistentVolumeClaim passes the strict schema and is ReadWriteMany."""
    kubernetes_validate.validate(SHARED_STORAGE, KUBERNETES_VERSION, strict=True)
    assert SHARED_STORAGE["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize(("field", "value"), [("imagePulPolicy", "IfNotPresent"), ("ports", [{"containerPort": "80"}])],
                         ids=["misspelt-field", "port-as-text"])
def test_a_broken_pod_template_fails_validation(field, value):
    """A misspelt or mistyped container field fails the schema check (so the check can fail)."""
    template = as_pod_template(copy.deepcopy(group_specs(RAYCLUSTER["spec"])["gpu"]))
    template["template"]["spec"]["containers"][0][field] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)


def ray_autoscaler_view(cluster_spec: dict) -> dict:
    """What Ray's autoscaler derives from a RayCluster with this spec (it validates the result itself)."""
    custom_resource = {"metadata": {"name": "xcm", "namespace": "default"}, "spec": copy.deepcopy(cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(custom_resource)


@pytest.mark.parametrize("manifest", ["raycluster", "rayjob"])
def test_ray_reads_a_cpu_only_head_and_autoscaled_gpu_workers(manifest):
    """Ray's autoscaler reads a head with 0 CPUs and a GPU group with 1 GPU per pod, scaling from zero."""
    spec = RAYCLUSTER["spec"] if manifest == "raycluster" else RAYJOB["spec"]["rayClusterSpec"]
    node_types = ray_autoscaler_view(spec)["available_node_types"]
    assert node_types["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in node_types["headgroup"]["resources"]
    assert node_types["gpu"]["resources"]["GPU"] == 1
    assert node_types["gpu"]["min_workers"] == 0 < node_types["gpu"]["max_workers"]


def test_rayjob_runs_on_a_copy_of_the_raycluster_spec():
    """The RayJob's cluster is exactly the RayCluster's spec, so the two cannot drift apart."""
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"]


def test_every_container_runs_the_pinned_image_and_reaches_mlflow():
    """All Ray containers run one image whose Ray is rayVersion, with MLFLOW_TRACKING_URI and the shared volume."""
    requirements = (ROOT / "infra" / "requirements-gpu.txt").read_text()
    ray_pin = re.search(r"^ray\[[^\]]*\]==(\S+)$", requirements, re.MULTILINE).group(1)
    assert RAYCLUSTER["spec"]["rayVersion"] == ray_pin
    assert RAYCLUSTER["spec"]["authOptions"] == {"mode": "token"}
    for container in containers(RAYCLUSTER["spec"]):
        environment = {item["name"]: item.get("value") for item in container["env"]}
        assert environment["MLFLOW_TRACKING_URI"].startswith("http://")
        assert container["image"] == containers(RAYCLUSTER["spec"])[0]["image"]
        assert "/mnt/xcm" in {mount["mountPath"] for mount in container["volumeMounts"]}


def entrypoint_arguments() -> list[str]:
    return shlex.split(RAYJOB["spec"]["entrypoint"])


def test_entrypoint_is_one_command_without_shell_operators():
    """The entrypoint is a plain `xcm run` (KubeRay's submitter runs it through a shell: `&&` would split it)."""
    arguments = entrypoint_arguments()
    assert arguments[:2] == ["xcm", "run"]
    assert not {"&&", "||", ";", "|"} & set(arguments) and not any(";" in argument for argument in arguments)


def test_entrypoint_job_is_a_valid_multi_node_gpu_spec():
    """The entrypoint's job file and overrides load as a spec: MLflow server, shared checkpoints, one GPU a worker."""
    from orchestrator.spec import load_spec

    arguments = entrypoint_arguments()
    job = arguments[2]
    overrides = [arguments[index + 1] for index, argument in enumerate(arguments) if argument == "--set"]
    working_dir = yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])["working_dir"]
    assert working_dir == "/home/ray/xcm"  # where infra/Dockerfile puts the repository
    spec = load_spec(ROOT / job, overrides)
    cluster_environment = {item["name"]: item.get("value") for item in containers(RAYCLUSTER["spec"])[0]["env"]}
    assert spec.tracking.uri == cluster_environment["MLFLOW_TRACKING_URI"]
    assert spec.tracking.artifact_location.startswith("mlflow-artifacts:/")
    assert spec.checkpointing.storage_path.startswith("/mnt/xcm/")
    gpu_group = group_specs(RAYCLUSTER["spec"])["gpu"]
    gpus_per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert spec.resources.use_gpu and spec.resources.gpus_per_worker <= gpus_per_pod
    assert spec.resources.num_workers <= gpu_group["maxReplicas"] * gpus_per_pod / spec.resources.gpus_per_worker

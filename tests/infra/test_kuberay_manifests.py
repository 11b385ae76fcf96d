"""The KubeRay manifests: valid Kubernetes pods, read by Ray's autoscaler as intended, running a valid xcm job,
locked down (restricted pods, secrets from Secrets, a NetworkPolicy around the Ray ports).

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
NETWORK_POLICY = yaml.safe_load((KUBERAY / "networkpolicy.yaml").read_text())
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
    return [
        container
        for group in group_specs(cluster_spec).values()
        for container in group["template"]["spec"]["containers"]
    ]


def pod_templates() -> dict[str, dict]:
    """Every pod template of the manifests: the Ray groups and the RayJob's submitter."""
    templates = {name: group["template"] for name, group in group_specs(RAYCLUSTER["spec"]).items()}
    templates["submitter"] = RAYJOB["spec"]["submitterPodTemplate"]
    return templates


@pytest.mark.parametrize("name", ["head", "gpu", "submitter"])
def test_pod_templates_are_valid_kubernetes(name):
    """Each pod template (the Ray groups, the RayJob's submitter) passes the strict Kubernetes schema (unknown or
    mistyped fields fail)."""
    template = as_pod_template({"template": pod_templates()[name]})
    kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)


def test_shared_volume_claim_is_valid_kubernetes():
    """The shared volume's PersistentVolumeClaim passes the strict schema and is ReadWriteMany."""
    kubernetes_validate.validate(SHARED_STORAGE, KUBERNETES_VERSION, strict=True)
    assert SHARED_STORAGE["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("imagePulPolicy", "IfNotPresent"), ("ports", [{"containerPort": "80"}])],
    ids=["misspelt-field", "port-as-text"],
)
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
    from orchestrator.train.job_checks import load_spec

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


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


@pytest.mark.parametrize("name", ["head", "gpu", "submitter"])
def test_every_pod_is_restricted(name):
    """Each pod runs as a non-root user under the runtime's default seccomp profile, and each of its containers
    without capabilities, privilege escalation or a writable root filesystem (Kubernetes' "restricted" Pod
    Security Standard, and more)."""
    spec = pod_templates()[name]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for container in spec["containers"]:
        assert container["securityContext"] == RESTRICTED_CONTAINER, container["name"]


def test_the_autoscaler_sidecar_is_restricted_too():
    """The autoscaler container that KubeRay adds to the head drops every capability and cannot escalate."""
    context = RAYCLUSTER["spec"]["autoscalerOptions"]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("name", ["head", "gpu", "submitter"])
def test_a_read_only_root_leaves_the_writable_paths_on_volumes(name):
    """Where Ray and its libraries write (Ray's session directory and temporary files under /tmp; for the Ray pods
    also DeepSpeed's compiled ops and the Hugging Face caches under ~/.cache), an emptyDir is mounted, and the
    caches that default to other places of the home are sent there."""
    spec = pod_templates()[name]["spec"]
    empty_dirs = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
    wanted = {"/tmp"} if name == "submitter" else {"/tmp", "/home/ray/.cache", "/dev/shm"}
    for container in spec["containers"]:
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert all(mounts.get(path) in empty_dirs for path in wanted), mounts
        if name != "submitter":
            environment = {item["name"]: item.get("value", "") for item in container["env"]}
            assert all(
                environment[variable].startswith("/home/ray/.cache/")
                for variable in ("TRITON_CACHE_DIR", "MPLCONFIGDIR")
            )


@pytest.mark.parametrize(
    ("variable", "secret", "key"),
    [
        ("XCM_CHECKPOINT_KEY", "xcm-checkpoint-key", "key"),
        ("MLFLOW_TRACKING_USERNAME", "xcm-mlflow-credentials", "username"),
        ("MLFLOW_TRACKING_PASSWORD", "xcm-mlflow-credentials", "password"),
    ],
)
def test_every_ray_container_takes_its_secrets_from_kubernetes_secrets(variable, secret, key):
    """The checkpoint key and MLflow's credentials reach every Ray container (where xcm's driver and workers run)
    from a Secret, required (a pod without them does not start), never as a literal value in the manifest."""
    for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]):
        for container in containers(spec):
            (item,) = [item for item in container["env"] if item["name"] == variable]
            assert "value" not in item
            assert item["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}, container["name"]


def test_network_policy_is_valid_kubernetes_and_selects_the_ray_pods():
    """The NetworkPolicy passes the strict Kubernetes schema and applies to the Ray pods of both manifests (which
    carry the labels it selects), not to the submitter."""
    kubernetes_validate.validate(NETWORK_POLICY, KUBERNETES_VERSION, strict=True)
    selector = NETWORK_POLICY["spec"]["podSelector"]["matchLabels"]
    labels = {name: template["metadata"]["labels"] for name, template in pod_templates().items()}
    assert selector.items() <= labels["head"].items() and selector.items() <= labels["gpu"].items()
    assert not selector.items() <= labels["submitter"].items()
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"]


def admitted(source_labels: dict, namespace_labels: dict, same_namespace: bool, port: int) -> bool:
    """Whether the NetworkPolicy admits a connection from such a pod to a Ray pod's port (Kubernetes' rules: any
    ingress rule that matches both the peer and the port admits it; a peer with a podSelector alone means this
    namespace; an empty selector matches everything)."""

    def matches(selector: dict | None, labels: dict) -> bool:
        return selector is not None and selector.get("matchLabels", {}).items() <= labels.items()

    for rule in NETWORK_POLICY["spec"]["ingress"]:
        ports = {entry["port"] for entry in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            namespace_ok = (
                matches(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer else same_namespace
            )
            if namespace_ok and matches(peer.get("podSelector", {}), source_labels):
                return True
    return False


RAY_POD = {"app.kubernetes.io/name": "xcm", "app.kubernetes.io/component": "ray"}
CLIENT = {"xcm-ray-client": "true"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}


@pytest.mark.parametrize(
    ("who", "source", "namespace", "same", "port", "allowed"),
    [
        ("ray pod, GCS", RAY_POD, {}, True, 6379, True),
        ("ray pod, any port", RAY_POD, {}, True, 45123, True),
        ("labelled client, Jobs API", CLIENT, {}, True, 8265, True),
        ("labelled client, Ray Client", CLIENT, {}, True, 10001, True),
        ("labelled client, GCS", CLIENT, {}, True, 6379, False),
        ("labelled client in a labelled namespace", CLIENT, CLIENT, False, 8265, True),
        ("labelled client in another namespace", CLIENT, {}, False, 8265, False),
        ("operator, Jobs API", OPERATOR, {"kubernetes.io/metadata.name": "kuberay"}, False, 8265, True),
        ("operator, GCS", OPERATOR, {}, False, 6379, False),
        ("unlabelled pod, Jobs API", {"app": "other"}, {}, True, 8265, False),
        ("unlabelled pod, GCS", {"app": "other"}, {}, True, 6379, False),
        ("the submitter", RAYJOB["spec"]["submitterPodTemplate"]["metadata"]["labels"], {}, True, 8265, True),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_network_policy_admits_the_cluster_and_labelled_clients_only(who, source, namespace, same, port, allowed):
    """The dashboard and Jobs API, the GCS and the Ray Client port are reachable from the cluster's own pods, from
    explicitly labelled clients (Jobs API and Ray Client only) and from the KubeRay operator (Jobs API only), and
    from nothing else."""
    assert admitted(source, namespace, same, port) is allowed

"""Every container image the deployment pulls is pinned by digest (name@sha256:...), so a pull gets the bytes that
were reviewed, whatever a registry later puts behind the tag; the images no public record gave a digest for are an
explicit, exact list of exceptions.

Images are found with the tools' own readers: dockerfile-parse for the FROM lines (and BuildKit's # syntax
frontend, an image too), the YAML of the Compose file, the KubeRay manifests and cluster.yaml.
"""

import re
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DIGEST = re.compile(r"^[\w.\-/:]+@sha256:[0-9a-f]{64}$")

# No digest pinned, and why. A pinned image listed here fails the test (the list must stay exact).
KNOWN_UNPINNED = {
    # NVIDIA's CUDA image: no public record of this tag's digest was found to verify one against (Docker Hub was
    # not reachable from where this was written). Pin it with the digest that
    # `docker buildx imagetools inspect nvidia/cuda:13.0.0-cudnn-devel-ubuntu22.04` prints.
    "nvidia/cuda:13.0.0-cudnn-devel-ubuntu22.04",
    # xcm's own image: its digest exists once you build and push it (`docker push` prints it); then replace the tag
    # by IMAGE@sha256:<digest> in cluster.yaml and the KubeRay manifests.
    "ghcr.io/your-org/xcm:0.1.0",
}


def dockerfile_images(path: Path) -> list[str]:
    """The FROM images of a Dockerfile and its BuildKit frontend (`# syntax=IMAGE`)."""
    parser = DockerfileParser(path=str(path))
    images = [item["value"].split()[0] for item in parser.structure if item["instruction"] == "FROM"]
    syntax = re.match(r"#\s*syntax=(\S+)", path.read_text())
    return images + ([syntax.group(1)] if syntax else [])


def compose_images() -> list[str]:
    """Images the Compose file pulls; a service with `build:` makes its image here (from pinned FROM lines)."""
    services = yaml.safe_load((ROOT / "infra" / "mlflow" / "docker-compose.yaml").read_text())["services"]
    return [service["image"] for service in services.values() if "build" not in service]


def pod_images(template: dict) -> list[str]:
    spec = template["spec"]
    return [container["image"] for container in [*spec.get("initContainers", []), *spec["containers"]]]


def kuberay_images() -> list[str]:
    cluster = yaml.safe_load((ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    job = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    images = []
    for spec in (cluster, job["rayClusterSpec"]):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images += [image for group in groups for image in pod_images(group["template"])]
        images += [spec["autoscalerOptions"]["image"]] if "image" in spec["autoscalerOptions"] else []
    return images + pod_images(job["submitterPodTemplate"])


def cluster_yaml_images() -> list[str]:
    docker = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]
    return [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]


IMAGES = {
    "infra/Dockerfile": dockerfile_images(ROOT / "infra" / "Dockerfile"),
    "infra/mlflow/Dockerfile": dockerfile_images(ROOT / "infra" / "mlflow" / "Dockerfile"),
    "infra/mlflow/docker-compose.yaml": compose_images(),
    "infra/kuberay": kuberay_images(),
    "cluster.yaml": cluster_yaml_images(),
}


def test_the_images_are_found():
    """Each file yields the images it is known to use (so an empty search cannot pass the pin test)."""
    assert [len(IMAGES[name]) for name in ("infra/mlflow/Dockerfile", "infra/mlflow/docker-compose.yaml")] == [1, 3]
    assert len(IMAGES["infra/Dockerfile"]) == 2 and len(IMAGES["infra/kuberay"]) == 5
    assert len(IMAGES["cluster.yaml"]) == 1


@pytest.mark.parametrize("source", sorted(IMAGES))
def test_every_image_is_pinned_by_digest_or_a_listed_exception(source):
    """Each image is name[:tag]@sha256:<64 hex digits>, or one of the listed exceptions."""
    unpinned = [image for image in IMAGES[source] if not DIGEST.match(image)]
    assert set(unpinned) <= KNOWN_UNPINNED, unpinned


def test_the_exceptions_are_exactly_the_unpinned_images():
    """Every listed exception is still used unpinned: a pinned one leaves the list."""
    unpinned = {image for images in IMAGES.values() for image in images if not DIGEST.match(image)}
    assert unpinned == KNOWN_UNPINNED


def test_a_tag_alone_fails_the_pin_check():
    """A plain tag, a digest of the wrong length and a digest with another algorithm are not pins."""
    for image in ("postgres:17.11", "postgres@sha256:abc", "postgres:17@sha512:" + "0" * 64):
        assert not DIGEST.match(image)
    assert DIGEST.match("postgres:17.11@sha256:" + "0" * 64)

"""Every YAML file of the deployment (cluster.yaml and infra/) parses, and holds only mappings."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
YAML_FILES = sorted([ROOT / "cluster.yaml", *(ROOT / "infra").rglob("*.yaml"), *(ROOT / "infra").rglob("*.yml")])


def test_the_deployment_files_are_found():
    """The glob finds the launcher config, the KubeRay manifests and network policy, and the Compose file."""
    names = {path.relative_to(ROOT).as_posix() for path in YAML_FILES}
    assert {
        "cluster.yaml",
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/networkpolicy.yaml",
        "infra/mlflow/docker-compose.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_yaml_file_parses_into_mappings(path):
    """The file is safe-loadable YAML whose every document is a non-empty mapping."""
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(document, dict) and document for document in documents)

"""infra/Dockerfile builds xcm's GPU image from a CUDA base with the pins of infra/requirements-gpu.txt.

Docker cannot build here, so the Dockerfile is parsed (dockerfile-parse) and its choices checked against the
requirements file and pyproject.toml, which the image must agree with.
"""

import re
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = DockerfileParser(path=str(ROOT / "infra" / "Dockerfile"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def instructions(name: str) -> list[str]:
    return [item["value"] for item in DOCKERFILE.structure if item["instruction"] == name]


def pinned_requirements() -> dict[str, Requirement]:
    lines = (ROOT / "infra" / "requirements-gpu.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {requirement.name.lower(): requirement for requirement in requirements}


def test_base_image_is_a_cuda_devel_image_with_python_311():
    """The image starts from NVIDIA's CUDA *devel* image (nvcc for DeepSpeed's ops) and installs Python 3.11."""
    image, _, tag = DOCKERFILE.baseimage.partition("@")[0].partition(":")
    assert image == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+(-cudnn)?-devel-ubuntu\d+\.\d+", tag)
    run = " ".join(instructions("RUN"))
    assert "python3.11-venv" in run and "python3.11 -m venv" in run
    assert Requirement(f"xcm{PROJECT['requires-python']}").specifier.contains("3.11")


def test_image_runs_as_a_non_root_user():
    """The last USER of the image is a named, non-root user."""
    assert instructions("USER")[-1] not in {"root", "0"}


def test_every_project_dependency_is_pinned_inside_its_range():
    """Each dependency of pyproject.toml has one exact pin in requirements-gpu.txt, satisfying pyproject's range."""
    pins = pinned_requirements()
    for dependency in map(Requirement, PROJECT["dependencies"]):
        pin = pins.get(dependency.name.lower())
        assert pin is not None, f"{dependency.name} is not pinned in infra/requirements-gpu.txt"
        (specifier,) = pin.specifier
        assert specifier.operator == "==", f"{pin} is not an exact pin"
        assert dependency.specifier.contains(specifier.version), f"{pin} is outside pyproject's {dependency}"
        assert dependency.extras <= pin.extras, f"{pin} lacks the extras of {dependency}"


def test_image_installs_the_pinned_requirements_then_xcm():
    """The image installs every pin from requirements-gpu.txt, then xcm itself from the copied repository."""
    run = instructions("RUN")
    pins = pinned_requirements()
    assert any("pip install -r infra/requirements-gpu.txt" in command for command in run)
    for pattern in re.findall(r"grep -E '([^']+)' infra/requirements-gpu\.txt", " ".join(run)):
        names = re.fullmatch(r"\^\(?([\w|-]+)\)?==", pattern).group(1).split("|")
        assert set(names) <= set(pins), f"the Dockerfile greps for {names}, not all pinned"
    assert run[-1].startswith("pip install --no-deps -e .")
    assert "infra/requirements-gpu.txt infra/requirements-gpu.txt" in " ".join(instructions("COPY"))


@pytest.mark.parametrize("path", [".git", "xcm-runs", "*.egg-info", "infra/mlflow/.env"])
def test_build_context_leaves_out_local_state(path):
    """The Dockerfile's ignore file keeps git history, runs, build metadata and the MLflow secrets out."""
    ignored = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
    assert path in ignored

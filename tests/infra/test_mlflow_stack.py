"""The MLflow stack (infra/mlflow/): a valid Compose file wiring PostgreSQL, MinIO and an MLflow server together.

Docker cannot run here, so the file is checked against the official Compose Specification schema (as vendored
by check-jsonschema), and the MLflow server's command line is parsed by MLflow's own CLI, as the container would.
"""

import copy
import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "mlflow"
COMPOSE_TEXT = (STACK / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
# ${NAME} or ${NAME:-default}; $${NAME} is an escape that reaches the container's shell unexpanded.
VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema, format_checker=validator.FORMAT_CHECKER)


def env_example() -> dict[str, str]:
    lines = (STACK / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolated(text: str, values: dict[str, str]) -> dict:
    """The Compose file as Compose reads it with these variables (the subset of interpolation the file uses)."""
    text = VARIABLE.sub(lambda match: values.get(match["name"], match["default"] or ""), text)
    return yaml.safe_load(text.replace("$$", "$"))


def test_compose_file_matches_the_compose_specification():
    """docker-compose.yaml is valid against the Compose Specification's JSON schema."""
    errors = [error.message for error in compose_schema_validator().iter_errors(COMPOSE)]
    assert not errors


@pytest.mark.parametrize("break_compose", ["misspelt-healthcheck", "unknown-depends-on-condition"])
def test_a_broken_copy_fails_the_compose_schema(break_compose):
    """A misspelt service key or an unknown depends_on condition fails the schema (so the check can fail)."""
    broken = copy.deepcopy(COMPOSE)
    mlflow = broken["services"]["mlflow"]
    if break_compose == "misspelt-healthcheck":
        mlflow["healthchek"] = mlflow.pop("healthcheck")
    else:
        mlflow["depends_on"]["postgres"]["condition"] = "service_ready"
    assert list(compose_schema_validator().iter_errors(broken))


def test_mlflow_starts_after_healthy_stores_and_created_buckets():
    """mlflow waits for healthy postgres and minio and for create-buckets to exit 0; every server has a healthcheck."""
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "minio", "create-buckets", "mlflow"}
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
        "create-buckets": {"condition": "service_completed_successfully"},
    }
    assert all("healthcheck" in services[name] for name in ("postgres", "minio", "mlflow"))
    assert services["create-buckets"]["restart"] == "no"
    assert {"postgres-data", "minio-data"} <= set(COMPOSE["volumes"])


def test_every_variable_is_documented_with_the_same_default():
    """Each ${VARIABLE} of the Compose file is in .env.example, with the file's inline default as its value."""
    documented = env_example()
    for match in VARIABLE.finditer(COMPOSE_TEXT):
        assert match["name"] in documented, f"{match['name']} is missing from .env.example"
        if match["default"] is not None:
            assert documented[match["name"]] == match["default"] or match["name"] == "MLFLOW_ALLOWED_HOSTS"


def test_published_ports_bind_to_localhost_by_default():
    """With the example settings, every published port listens on 127.0.0.1 only; PostgreSQL is not published."""
    services = interpolated(COMPOSE_TEXT, env_example())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)
    assert "ports" not in services["postgres"]


def test_buckets_are_created_for_artifacts_and_checkpoints():
    """The one-shot service creates the MLflow artifact bucket and the checkpoint bucket, idempotently."""
    values = env_example()
    service = interpolated(COMPOSE_TEXT, values)["services"]["create-buckets"]
    # What the container's shell runs, its ${NAME} taken from the service's environment.
    command = re.sub(r"\$\{(\w+)\}", lambda match: service["environment"][match[1]], service["command"][0])
    assert f'mc mb --ignore-existing "local/{values["MLFLOW_BUCKET"]}"' in command
    assert f'mc mb --ignore-existing "local/{values["CHECKPOINT_BUCKET"]}"' in command


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow's store
def test_mlflow_command_is_accepted_by_mlflow_and_uses_postgres_and_minio():
    """MLflow's own CLI parses the server command: PostgreSQL backend store, proxied artifacts in the MinIO bucket."""
    from mlflow.cli import server

    values = env_example()
    service = interpolated(COMPOSE_TEXT, values)["services"]["mlflow"]
    program, verb, *arguments = service["command"]
    assert (program, verb) == ("mlflow", "server")
    options = server.make_context("server", list(arguments)).params
    assert options["backend_store_uri"] == (f"postgresql+psycopg2://{values['POSTGRES_USER']}:"
                                            f"{values['POSTGRES_PASSWORD']}@postgres:5432/{values['POSTGRES_DB']}")
    assert options["serve_artifacts"] and options["artifacts_destination"] == f"s3://{values['MLFLOW_BUCKET']}"
    assert options["host"] == "0.0.0.0" and options["port"] == 5000
    assert service["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_server_image_pins_the_clients_mlflow():
    """The server image installs exactly the MLflow version the training image pins, plus its store drivers."""
    requirements = (ROOT / "infra" / "requirements-gpu.txt").read_text()
    client_pin = re.search(r"^mlflow==\S+$", requirements, re.MULTILINE).group(0)
    dockerfile = DockerfileParser(path=str(STACK / "Dockerfile"))
    install = " ".join(item["value"] for item in dockerfile.structure if item["instruction"] == "RUN")
    assert client_pin in install.split()
    assert re.search(r"\bpsycopg2-binary==\S+", install) and re.search(r"\bboto3==\S+", install)
    assert COMPOSE["services"]["mlflow"]["image"].endswith(":" + client_pin.split("==")[1])

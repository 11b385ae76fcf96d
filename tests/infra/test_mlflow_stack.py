"""The MLflow stack (infra/mlflow/): a valid Compose file wiring PostgreSQL, MinIO and an MLflow server together,
that refuses to start without its passwords, and an MLflow server that refuses requests without one.

Docker cannot run here, so the file is checked against the official Compose Specification schema (as vendored
by check-jsonschema), its variables are substituted by the rules of the specification's Interpolation section
(which `docker compose config` applies, failing on a required variable), and the MLflow server's command line and
its basic-auth configuration are read by MLflow's own code, as the container would.
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
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "mlflow"
COMPOSE_TEXT = (STACK / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
DOCKERFILE = DockerfileParser(path=str(STACK / "Dockerfile"))
# The variables Compose must refuse to start without: no default can stand in for a secret.
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY")
TEST_SECRETS = {name: f"test{index}secret0123456789" for index, name in enumerate(SECRETS)}

# The Compose Specification's interpolation: $$ (a literal $), ${NAME}, $NAME, and ${NAME<op><argument>} with the
# operators :- - (default), :? ? (required, with an error message), :+ + (replacement); ':' also counts an empty
# value as missing.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<operator>:?[-?+])"
    r"(?P<argument>[^}]*))?\}|(?P<named>[A-Za-z_]\w*))"
)


class MissingVariable(ValueError):
    """What `docker compose` reports for a required variable: "required variable NAME is missing a value"."""


def interpolate(text: str, environment: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, operator, argument = match["braced"] or match["named"], match["operator"], match["argument"]
        value = environment.get(name)
        missing = not value if operator and operator.startswith(":") else value is None
        if operator in (":-", "-"):
            return argument if missing else value
        if operator in (":?", "?"):
            if missing:
                raise MissingVariable(f"required variable {name} is missing a value: {argument}")
            return value
        if operator in (":+", "+"):
            return "" if missing else argument
        return value or ""

    return INTERPOLATION.sub(substitute, text)


def interpolated(document, environment: dict[str, str]):
    """The parsed Compose file as Compose uses it: every string value interpolated (keys are not)."""
    if isinstance(document, dict):
        return {key: interpolated(value, environment) for key, value in document.items()}
    if isinstance(document, list):
        return [interpolated(value, environment) for value in document]
    return interpolate(document, environment) if isinstance(document, str) else document


def env_example() -> dict[str, str]:
    lines = (STACK / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def configured() -> dict[str, str]:
    """The example settings with every secret filled in, as a user's .env has them."""
    return {**env_example(), **TEST_SECRETS}


def variables() -> list[re.Match]:
    return [match for match in INTERPOLATION.finditer(COMPOSE_TEXT) if not match["escaped"]]


def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema, format_checker=validator.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification():
    """docker-compose.yaml, as written and as interpolated with a full .env, is valid against the Compose
    Specification's JSON schema."""
    validator = compose_schema_validator()
    assert not [error.message for error in validator.iter_errors(COMPOSE)]
    assert not [error.message for error in validator.iter_errors(interpolated(COMPOSE, configured()))]


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


def test_compose_refuses_to_start_without_a_env_file():
    """With no .env (no variable set), interpolation fails on a required password instead of starting the
    stack with a guessable one."""
    with pytest.raises(MissingVariable, match=r"required variable \w+ is missing a value: set \w+ in infra/mlflow"):
        interpolated(COMPOSE, {})


def test_compose_refuses_to_start_with_the_example_settings_unchanged():
    """A copy of .env.example whose passwords were never set does not start either: an empty value is missing."""
    with pytest.raises(MissingVariable):
        interpolated(COMPOSE, env_example())


@pytest.mark.parametrize("secret", SECRETS)
def test_each_secret_is_required(secret):
    """Leaving out any one secret (or setting it empty) stops Compose with an error naming it; with all of them
    set, the file interpolates."""
    interpolated(COMPOSE, configured())
    for value in ({}, {secret: ""}):
        environment = {key: item for key, item in {**configured(), **value}.items() if value or key != secret}
        with pytest.raises(MissingVariable, match=f"required variable {secret} is missing"):
            interpolated(COMPOSE, environment)


def test_no_secret_has_a_default_and_no_placeholder_password_is_left():
    """Every use of a secret is ${NAME:?...}; no file of the deployment carries a change-me placeholder."""
    for match in variables():
        if match["braced"] in SECRETS:
            assert match["operator"] == ":?", match.group(0)
    files = [ROOT / "cluster.yaml", *(path for path in (ROOT / "infra").rglob("*") if path.is_file())]
    assert not [path for path in files if "change-me" in path.read_text().lower()]


def test_every_variable_is_documented_with_the_same_default():
    """Each variable of the Compose file is in .env.example, with the file's inline default as its value; the
    secrets are there without one."""
    documented = env_example()
    for match in variables():
        name = match["braced"] or match["named"]
        assert name in documented, f"{name} is missing from .env.example"
        if match["operator"] == ":-" and name != "MLFLOW_ALLOWED_HOSTS":
            assert documented[name] == match["argument"], name
    assert all(documented[name] == "" for name in SECRETS)


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
    assert {"postgres-data", "minio-data", "mlflow-auth"} <= set(COMPOSE["volumes"])


def test_published_ports_bind_to_localhost_by_default():
    """With the example settings, every published port listens on 127.0.0.1 only; PostgreSQL is not published."""
    services = interpolated(COMPOSE, configured())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)
    assert "ports" not in services["postgres"]


def test_buckets_are_created_for_artifacts_and_checkpoints():
    """The one-shot service creates the MLflow artifact bucket and the checkpoint bucket, idempotently."""
    values = configured()
    service = interpolated(COMPOSE, values)["services"]["create-buckets"]
    # What the container's shell runs, its ${NAME} taken from the service's environment.
    command = re.sub(r"\$\{(\w+)\}", lambda match: service["environment"][match[1]], service["command"][0])
    assert f'mc mb --ignore-existing "local/{values["MLFLOW_BUCKET"]}"' in command
    assert f'mc mb --ignore-existing "local/{values["CHECKPOINT_BUCKET"]}"' in command


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow's store
def test_mlflow_command_is_accepted_by_mlflow_and_uses_auth_postgres_and_minio(monkeypatch):
    """MLflow's own CLI parses the server command and environment: the basic-auth app, the PostgreSQL backend store
    (from the environment, not the command line, where process listings would show its password), proxied
    artifacts in the MinIO bucket."""
    from mlflow.cli import server

    values = configured()
    service = interpolated(COMPOSE, values)["services"]["mlflow"]
    program, verb, *arguments = service["command"]
    assert (program, verb) == ("mlflow", "server")
    assert not any(values["POSTGRES_PASSWORD"] in argument for argument in arguments)
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", service["environment"]["MLFLOW_BACKEND_STORE_URI"])
    options = server.make_context("server", list(arguments)).params
    assert options["app_name"] == "basic-auth"
    assert options["backend_store_uri"] == (
        f"postgresql+psycopg2://{values['POSTGRES_USER']}:"
        f"{values['POSTGRES_PASSWORD']}@postgres:5432/{values['POSTGRES_DB']}"
    )
    assert options["serve_artifacts"] and options["artifacts_destination"] == f"s3://{values['MLFLOW_BUCKET']}"
    assert options["host"] == "0.0.0.0" and options["port"] == 5000
    assert service["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def dockerfile_values(instruction: str) -> list[str]:
    return [item["value"] for item in DOCKERFILE.structure if item["instruction"] == instruction]


def auth_environment() -> dict[str, str]:
    """The mlflow container's basic-auth settings: the compose file's, and the image's config path."""
    environment = interpolated(COMPOSE, configured())["services"]["mlflow"]["environment"]
    return {
        **{key: value for key, value in environment.items() if "AUTH" in key or "SECRET" in key},
        "MLFLOW_AUTH_CONFIG_PATH": DOCKERFILE.envs["MLFLOW_AUTH_CONFIG_PATH"],
    }


def test_basic_auth_config_is_read_by_mlflow_with_the_admin_from_the_environment(monkeypatch):
    """MLflow's reader of the auth configuration takes the image's file and the compose file's admin; the user
    store is a file in the image's working directory, which is the mlflow-auth volume."""
    from mlflow.server.auth.config import read_auth_config

    environment = auth_environment()
    (copied,) = [value.split() for value in dockerfile_values("COPY") if "basic_auth.ini" in value]
    assert copied == ["basic_auth.ini", environment["MLFLOW_AUTH_CONFIG_PATH"]]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(STACK / "basic_auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", environment["MLFLOW_AUTH_ADMIN_USERNAME"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", environment["MLFLOW_AUTH_ADMIN_PASSWORD"])
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == ("admin", TEST_SECRETS["MLFLOW_ADMIN_PASSWORD"])
    assert config.database_uri == "sqlite:///basic_auth.db" and config.default_permission == "READ"
    assert environment["MLFLOW_FLASK_SERVER_SECRET_KEY"] == TEST_SECRETS["MLFLOW_SECRET_KEY"]
    volumes = COMPOSE["services"]["mlflow"]["volumes"]
    assert f"mlflow-auth:{dockerfile_values('WORKDIR')[-1]}" in volumes


@pytest.mark.slow  # a real server: 10 s to start on an idle machine, a minute on a busy one
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_server_refuses_requests_without_the_password(mlflow_server, monkeypatch):
    """A real MLflow server started with the stack's auth app, configuration and settings answers 401 to a client
    without credentials or with a wrong password, serves xcm's client signed in as the admin, and an account the
    admin creates (the cluster's) tracks runs."""
    import requests
    from mlflow.exceptions import MlflowException

    from orchestrator import tracking

    environment = {**auth_environment(), "MLFLOW_AUTH_CONFIG_PATH": str(STACK / "basic_auth.ini")}
    server = mlflow_server("auth", ["--app-name", "basic-auth"], environment)
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=("admin", "not-the-password"), timeout=30).status_code == 401
    assert (server.directory / "basic_auth.db").is_file()  # the user store, where the working directory is
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):
        tracking.client(server.uri).create_experiment("refused")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TEST_SECRETS["MLFLOW_ADMIN_PASSWORD"])
    assert tracking.client(server.uri).create_experiment("signed-in")
    # infra/README.md's next step: the admin creates the cluster's account, which then tracks runs.
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=server.uri).create_user("xcm-cluster", "cluster-password-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "xcm-cluster")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "cluster-password-0123456789")
    cluster = tracking.client(server.uri)
    run = cluster.create_run(cluster.create_experiment("cluster-runs"))
    cluster.log_metric(run.info.run_id, "loss", 1.0, step=0)


def test_server_image_pins_the_clients_mlflow_with_its_auth_extra():
    """The server image installs exactly the MLflow version the training image pins, with the basic-auth app's
    extra and its store drivers, and runs as a non-root user."""
    requirements = (ROOT / "infra" / "requirements-gpu.txt").read_text()
    client_pin = Requirement(re.search(r"^mlflow==\S+$", requirements, re.MULTILINE).group(0))
    install = " ".join(dockerfile_values("RUN"))
    (server_pin,) = [Requirement(word.strip('"')) for word in install.split() if re.match(r'"?mlflow\W', word)]
    assert server_pin.specifier == client_pin.specifier and "auth" in server_pin.extras
    assert re.search(r"\bpsycopg2-binary==\S+", install) and re.search(r"\bboto3==\S+", install)
    assert COMPOSE["services"]["mlflow"]["image"].endswith(":" + str(client_pin.specifier).removeprefix("=="))
    assert dockerfile_values("USER")[-1] not in {"root", "0"}

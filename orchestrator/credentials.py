"""Credentials in URIs (``http://user:password@mlflow:5000``, ``s3://KEY:SECRET@bucket/path``) never travel on.

Whatever a URI holds is shown to everyone who can read any place the URI goes: MLflow params, the ``spec.yaml``
artifact, every checkpoint's ``job.yaml``, a Ray job's metadata and entrypoint (``xcm status`` / ``xcm list``,
the dashboard), the metric sender's command line (``ps``), printed links and error messages. So where a spec or a
URI enters xcm (``take_from_spec``, ``take``), its credentials move into this process's environment, under the
names the client libraries read on their own (MLflow: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
S3 through pyarrow, which Ray Train uses, and boto3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``), and only
the URI without them goes on. Processes started from here inherit them: the local Ray that ``xcm run`` starts
(its raylet, so every worker) and the metric sender. A job on a cluster takes them from the cluster's own
environment (a Kubernetes Secret in the pods), never from the job's runtime environment, which the dashboard shows.

``redact`` is the one way a text that may hold a URI is shown: ``user:***@``.
"""

from __future__ import annotations

import os
import re
from typing import Any, TypeVar
from urllib.parse import unquote

from pydantic import BaseModel

from orchestrator.spec_problems import SpecError, SpecProblem

Spec = TypeVar("Spec", bound=BaseModel)  # a JobSpec (the schema imports this module, so not by name)

# The environment variables (user, secret) that each scheme's client reads credentials from.
ENVIRONMENT_BY_SCHEME = {
    "http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "https": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
}
# The spec keys whose URIs may carry credentials: the tracking server, and the storage of artifacts and checkpoints.
URI_KEYS = ("tracking.uri", "tracking.artifact_location", "checkpointing.storage_path")
_ELSEWHERE = (
    "remove them from the URI and set them in the environment variables that the storage's client reads, on every node"
)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")


class CredentialError(ValueError):
    """Credentials in a URI that xcm cannot pass on through the environment: the message names the fix."""


def has_credentials(uri: str) -> bool:
    return bool(_USERINFO.match(uri))


def strip(uri: str) -> str:
    """The URI without its ``user:password@`` part (and unchanged when it has none)."""
    return _USERINFO.sub(r"\g<scheme>", uri, count=1) if has_credentials(uri) else uri


def redact(text: str) -> str:
    """``text`` with every URI's password shown as ``***`` (a user alone, which may be a token, as ``***``)."""

    def masked(match: re.Match) -> str:
        user, _, password = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if password else f"{match['scheme']}***@"

    return _USERINFO.sub(masked, text)


def environment_for(uri: str) -> tuple[str, dict[str, str]]:
    """The URI without credentials, and the environment variables that carry them to its client library."""
    match = _USERINFO.match(uri)
    if not match:
        return uri, {}
    if _scheme(uri) not in ENVIRONMENT_BY_SCHEME:
        raise CredentialError(
            f"{redact(uri)} carries credentials, and xcm passes them on only for "
            f"{', '.join(sorted(ENVIRONMENT_BY_SCHEME))} URIs: {_ELSEWHERE}"
        )
    user_variable, secret_variable = ENVIRONMENT_BY_SCHEME[_scheme(uri)]
    user, has_secret, secret = match["userinfo"].partition(":")
    variables = {user_variable: unquote(user)}
    if has_secret:
        variables[secret_variable] = unquote(secret)
    return strip(uri), variables


def take(uri: str | None) -> str | None:
    """Move a URI's credentials into this process's environment; the URI without them."""
    if uri is None:
        return None
    clean, variables = environment_for(uri)
    os.environ.update(variables)
    return clean


def take_from_spec(spec: Spec) -> tuple[Spec, list[str]]:
    """The spec with the credentials of its URIs moved into this process's environment (see the module's
    docstring), and the names of the variables set; raises SpecError for credentials anywhere else, or two URIs
    that disagree on them."""
    found = _strings_with_credentials(spec.model_dump(mode="json", by_alias=True))
    problems, variables, updates = [], {}, {}
    for key, uri in found.items():
        if key not in URI_KEYS:
            problems.append(
                SpecProblem(
                    key=key,
                    message=f"{redact(uri)} carries credentials",
                    fix=f"remove them: xcm reads credentials only in {', '.join(URI_KEYS)}",
                )
            )
            continue
        if _scheme(uri) not in ENVIRONMENT_BY_SCHEME:
            problems.append(
                SpecProblem(
                    key=key,
                    message=f"{redact(uri)} carries credentials, and xcm passes them on only for "
                    f"{', '.join(sorted(ENVIRONMENT_BY_SCHEME))} URIs",
                    fix=_ELSEWHERE,
                )
            )
            continue
        clean, carried = environment_for(uri)
        for name, value in carried.items():
            if variables.setdefault(name, value) != value:
                problems.append(
                    SpecProblem(
                        key=key,
                        message=f"its credentials differ from another URI's ({name})",
                        fix="use the same account in every URI, or set them in the environment",
                    )
                )
        updates[key] = clean
    if problems:
        raise SpecError(f"job {spec.name!r}", problems)
    os.environ.update(variables)
    return _with_values(spec, updates), sorted(variables)


def strip_all(value: Any) -> Any:
    """A spec's dump (dicts, lists, strings) with the credentials of every URI in it left out: what is stored
    or shown of a spec, even one that did not pass through ``take_from_spec``."""
    if isinstance(value, dict):
        return {key: strip_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strip_all(item) for item in value]
    return strip(value) if isinstance(value, str) else value


def _strings_with_credentials(value: Any, prefix: str = "") -> dict[str, str]:
    """Every string of a spec's dump that carries credentials, by its dotted key."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value} if isinstance(value, str) and has_credentials(value) else {}
    found: dict[str, str] = {}
    for key, item in items:
        found.update(_strings_with_credentials(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _scheme(uri: str) -> str:
    return uri.partition("://")[0].lower()


def _with_values(spec: Spec, updates: dict[str, str]) -> Spec:
    """The spec with ``section.key`` values replaced."""
    sections: dict[str, dict[str, str]] = {}
    for key, value in updates.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = value
    return spec.model_copy(
        update={section: getattr(spec, section).model_copy(update=fields) for section, fields in sections.items()}
    )

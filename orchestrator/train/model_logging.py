"""The trained model as an MLflow model of its run, logged by the driver once training has ended.

A language model goes in MLflow's transformers flavour with its tokenizer (xcm's byte vocabulary as a
``transformers`` fast tokenizer of the same ids), so ``mlflow.transformers.load_model`` gives a working model and
tokenizer; xcm's classifiers go in the PyTorch flavour as a ``torch.export`` program (MLflow's "pt2": loading it
runs no pickled code and needs no xcm). The partition the model was trained under goes beside it in the logged
model's artifacts as ``partition.parquet``; ``tracking.register_model`` registers the logged model.

The weights come from the run's newest checkpoint (the one written at the last step), verified and consolidated as
``xcm export`` does. A language model's consolidated weights are written to safetensors shards and freed before
the model is loaded from them, so the process never holds two copies; a model whose fp32 weights exceed
``tracking.log_model_max_gb`` is logged only when the spec asks for it (``tracking.log_model: true``, or a
``register_model`` name).

It runs in a child process (``orchestrator.train.model_logging_process``): loading and uploading a model can take
a lot of memory and a long time, and a child that fails, or is killed for memory, leaves the driver and the run as
they were. A model that is not logged is a
warning on a FINISHED run whose metrics and checkpoints are all there, unless the spec asked for registration:
then the run ends FAILED, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import credentials, tracking
from orchestrator.train import checkpoint_store as store

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run
CHILD_MODULE = "orchestrator.train.model_logging_process"  # run by name: the driver imports none of its loading
PARTITION_FILE = "partition.parquet"
FAILURE_TAG = "xcm.model_logging_failure"  # on a run whose model could not be logged, why
TOO_LARGE_EXIT_CODE = 3  # the child's exit status for a model over the size limit that nobody asked for
_LAST_LINES = 15  # of the child's output, quoted in the warning when it fails
RESULT_PREFIX = "xcm-model-logging: "  # starts the child's answer on its standard output, among whatever else it prints


class ModelNotRegistered(RuntimeError):
    """The spec asked for the model in the Model Registry and it is not there: the run fails with this."""


def log_trained_model(spec: JobSpec, run_id: str, say: Callable[[str], object] = print) -> None:
    """Log the run's trained model (see the module's docstring), saying what became of it in one line."""
    if spec.tracking.log_model is False:
        return
    started = time.monotonic()
    try:
        child = subprocess.run(
            [sys.executable, "-m", CHILD_MODULE, store.run_directory(spec, run_id), run_id],
            env=_child_environment(spec.tracking.uri, run_id),
            capture_output=True,
            text=True,
            check=False,
        )
    except Exception as error:  # the store gone by now, no interpreter to start: still only the model is missing
        _not_logged(spec, run_id, f"{type(error).__name__}: {error}")
        return
    said = [line.removeprefix(RESULT_PREFIX) for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode == 0 and said:
        say(_logged_line(json.loads(said[-1]), time.monotonic() - started))
    elif child.returncode == TOO_LARGE_EXIT_CODE and said:
        say(f"xcm: {said[-1]}")
    else:
        last_lines = "\n".join((child.stdout + child.stderr).strip().splitlines()[-_LAST_LINES:])
        _not_logged(spec, run_id, f"exit status {child.returncode}:\n{last_lines}")


def _logged_line(logged: dict, seconds: float) -> str:
    registered = (
        f", registered as {logged['registered_name']} version {logged['registered_version']}"
        if logged.get("registered_version")
        else ""
    )
    return f"xcm: trained model logged to MLflow as {logged['model_uri']}{registered} ({seconds:.0f} s)"


def _not_logged(spec: JobSpec, run_id: str, why: str) -> None:
    """The model is not in MLflow: the run FAILS if registration was asked for, else goes on with a warning."""
    reason = f"logging the trained model failed ({why})"
    if spec.tracking.register_model:
        raise ModelNotRegistered(f"{reason}\nso it is not registered as {spec.tracking.register_model}")
    try:
        tracking.client(spec.tracking.uri).set_tag(run_id, FAILURE_TAG, credentials.redact(reason)[-5000:])
    except Exception as error:
        logger.warning("could not tag MLflow run %s with %s: %s", run_id, FAILURE_TAG, error)
    logger.warning(
        "%s\nThe run's metrics and checkpoints are kept (`xcm export %s --to hf DIR` writes a language model "
        "from its last checkpoint).",
        reason,
        run_id,
    )


def _child_environment(uri: str, run_id: str) -> dict[str, str]:
    """This environment, the package's import path, and the run's store and experiment for MLflow's fluent
    model logging; credentials of the URI travel in the environment, never on the command line."""
    import orchestrator

    package_root = str(Path(orchestrator.__file__).resolve().parents[1])
    bare_uri, carried = credentials.environment_for(uri)
    experiment_id = tracking.client(uri).get_run(run_id).info.experiment_id
    return {
        **os.environ,  # holds tracking's client settings too, since tracking.client has just run
        **carried,
        "MLFLOW_TRACKING_URI": bare_uri,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }

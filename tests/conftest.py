"""Shared fixtures: real Ray, DeepSpeed and MLflow, started inside the tests and stopped afterwards."""

import os

import pytest

# A dead MLflow store must fail fast in tests, not after MLflow's default ~4 minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test that trains (starting Ray costs seconds on 2 cores); shut down at the end."""
    yield
    import ray

    ray.shutdown()

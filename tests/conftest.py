"""Shared fixtures: real Ray, DeepSpeed and MLflow, started inside the tests and stopped afterwards; tiny models."""

import os
import shutil

import pytest
import torch

from tests.helpers import MlflowServer, tiny_gpt2, train_mnist_mlp_checkpoint

# A dead MLflow store must fail fast in tests, not after MLflow's default ~4 minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Checkpoints are signed with this key (the local Ray's workers inherit it), so no test writes the user's key file.
os.environ.setdefault("XCM_CHECKPOINT_KEY", "xcm-tests-checkpoint-key-0123456789abcdef")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test that trains (starting Ray costs seconds on 2 cores); shut down at the end."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    """Makes started `mlflow server`s (``mlflow_server(name, arguments, environment)``) in the test's directory,
    run there (a relative path in their configuration lands in it); all killed at the end."""
    servers = []

    def start(name: str = "server", arguments=(), environment=None) -> MlflowServer:
        server = MlflowServer(tmp_path / name, arguments, environment)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def _mnist_mlp_training(tmp_path_factory):
    """One `xcm run` of the small MNIST MLP for the whole session: its working directory and run directory."""
    directory = tmp_path_factory.mktemp("mnist-mlp-training")
    return directory, train_mnist_mlp_checkpoint(directory, timeout=600).relative_to(directory)


@pytest.fixture
def mnist_mlp_checkpoint(_mnist_mlp_training, tmp_path):
    """The run directory of a small MNIST MLP checkpoint (``train_mnist_mlp_checkpoint``) in the test's own
    directory: the session's one training run, its MLflow store and checkpoints copied there, so a test that
    writes beside it (`xcm circuits` logs into that store) changes no other test's copy."""
    trained, run_directory = _mnist_mlp_training
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path / run_directory


@pytest.fixture(name="tiny_gpt2", scope="module")
def tiny_gpt2_fixture():
    """The tiny GPT-2 of tests/helpers.py in eval mode, one per test module."""
    return tiny_gpt2().eval()


class _Payload:
    """Unpickling it creates ``marker``: proof that a checkpoint file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class CheckpointFiles:
    """Checkpoints as xcm's ranks leave them, and as an attacker who can write the store but does not hold the
    cluster's key leaves them."""

    ATTACKER_KEY = b"the attacker's own key, not the cluster's: 0123456789"

    @staticmethod
    def write(
        run,
        step: int,
        manifest: bool = True,
        tag: str | None = None,
        zero_stage: int = 2,
        session: str = "first-launch",
        transformers_model: bool = False,
    ):
        """DeepSpeed-like shards, xcm's JSON files, then the manifest signed with this machine's key."""
        import json

        from orchestrator.train import checkpoint_store as store

        directory = run / store.checkpoint_name(step)
        shards = directory / "deepspeed" / f"step-{step}"
        shards.mkdir(parents=True)
        for rank in range(2):
            (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank, step]) * 1000)
        (shards / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
        (directory / "xcm").mkdir()
        state = store.CheckpointState(
            step=step,
            data_position=step,
            world_size=2,
            zero_stage=zero_stage,
            run_id="0123456789abcdef0123456789abcdef",
            deepspeed_tag=tag or f"step-{step}",
            session=session,
        )
        (directory / store.STATE).write_text(state.to_json())
        (directory / store.PARTITION).write_text("null")
        if transformers_model:
            (directory / store.MODEL_CONFIG).write_text(
                json.dumps(
                    {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16, "n_positions": 8}
                )
            )
        if manifest:
            store.write_manifest(directory, store.file_records(directory))
        return directory

    @staticmethod
    def plant_payload(path, marker) -> None:
        """Replace a file with a torch file whose loading (weights_only=False) runs code."""
        torch.save({"module": _Payload(marker)}, path)

    @staticmethod
    def recompute_manifest(directory, key: bytes | None = None) -> None:
        """The attacker's manifest: every size and sha256 recomputed, signed with ``key`` when given (the
        attacker's own key), else with the old signature kept."""
        import json

        from orchestrator.train import checkpoint_store as store

        manifest = json.loads((directory / store.MANIFEST).read_text())
        manifest["files"] = {
            name: record for name, record in store.file_records(directory).items() if name != store.MANIFEST
        }
        if key is not None:
            manifest["key_id"] = store.key_id(key)
            manifest["hmac"] = store._signature(manifest, key)
        (directory / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def checkpoint_files():
    return CheckpointFiles


@pytest.fixture
def marker(tmp_path):
    """Where a planted payload would leave its mark; asserted absent."""
    return tmp_path / "payload-ran"

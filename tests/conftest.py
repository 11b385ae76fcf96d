"""Shared fixtures: real Ray, DeepSpeed and MLflow, started inside the tests and stopped afterwards; tiny models."""

import os

import pytest
import torch

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


@pytest.fixture(scope="module")
def tiny_gpt2():
    """GPT-2 with Conv1D MLP weights stored [n_in, n_out]: c_fc [64, 256], c_proj [256, 64]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()

"""Tiny transformers models shared by the modularity tests (width 64, 2 layers, random weights)."""

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_gpt2():
    """GPT-2 with Conv1D MLP weights stored [n_in, n_out]: c_fc [64, 256], c_proj [256, 64]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()

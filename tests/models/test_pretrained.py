"""Transformer families from a local pretrained directory: the saved weights come back, for each family."""

import pytest
import torch

from orchestrator.models import build_model
from orchestrator.spec import ModelSpec


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma"])
def test_local_pretrained_directory_loads_its_weights(tmp_path, family):
    """init: pretrained with a directory written by save_pretrained rebuilds that model, weights and all."""
    saved = build_model(ModelSpec(family=family), vocab_size=259, seed=7)
    saved.save_pretrained(tmp_path)
    loaded = build_model(ModelSpec(family=family, init="pretrained", pretrained=str(tmp_path)), vocab_size=259, seed=0)
    assert type(loaded) is type(saved)
    for (name, expected), (_, actual) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(expected, actual), name

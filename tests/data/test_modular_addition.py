"""Modular addition data: every pair once, correct sums, a seeded held-out share."""

import torch

from orchestrator.data.modular_addition import build_modular_addition_data, modular_addition_examples
from orchestrator.spec import DataSpec, ModelSpec


def test_every_pair_appears_once_with_its_sum():
    """All p² prompts [a, b, =] exist once; each label is (a + b) mod p; '=' is token p."""
    examples = modular_addition_examples(7)
    assert examples.inputs.shape == (49, 3)
    assert len({tuple(row[:2].tolist()) for row in examples.inputs}) == 49
    assert torch.equal(examples.labels, (examples.inputs[:, 0] + examples.inputs[:, 1]) % 7)
    assert set(examples.inputs[:, 2].tolist()) == {7}


def test_held_out_pairs_follow_the_validation_fraction():
    """validation_fraction of the pairs are held out; vocabulary is p + 1 tokens and there are p classes."""
    data = build_modular_addition_data(
        DataSpec(source="modular_addition", modulus=11, validation_fraction=0.7), ModelSpec(family="modular_addition")
    )
    assert (len(data.train), len(data.validation)) == (36, 85)
    assert (data.vocab_size, data.num_classes) == (12, 11)

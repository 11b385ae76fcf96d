"""Modular addition, ``(a + b) mod p``: every pair as the prompt ``a b =`` and its sum as the class.

The grokking task of the papers' algorithmic experiment: all p² pairs exist, a seeded share is held out,
and a model that generalises to the held-out pairs has learnt the algorithm, not the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orchestrator.data.examples import ExampleData, LabelledExamples, split_examples

if TYPE_CHECKING:
    from orchestrator.spec import DataSpec, ModelSpec


def modular_addition_examples(modulus: int) -> LabelledExamples:
    """All ``modulus²`` prompts ``[a, b, =]`` (``=`` is token ``modulus``) with labels ``(a + b) % modulus``."""
    a, b = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus)).T  # [p²] each
    equals = torch.full_like(a, modulus)
    return LabelledExamples(inputs=torch.stack([a, b, equals], dim=1), labels=(a + b) % modulus)  # [p², 3], [p²]


def build_modular_addition_data(data: DataSpec, model: ModelSpec) -> ExampleData:
    """Training and held-out pairs (``data.validation_fraction`` of them, drawn with ``data.seed``)."""
    train, validation = split_examples(modular_addition_examples(data.modulus), data.validation_fraction, data.seed)
    return ExampleData(train=train, validation=validation, num_classes=data.modulus, vocab_size=data.modulus + 1)

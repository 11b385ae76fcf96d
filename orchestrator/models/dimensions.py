"""A model's sizes as the spec checks need them, whatever the family (transformers' configs or xcm's own)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDimensions:
    hidden: int
    intermediate: int
    max_positions: int
    layers: int
    vocab_size: int

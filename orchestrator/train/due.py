"""The one rule for "is it due at this step", for everything the loop does every N steps.

Steps are indices from 0; a thing done "every N steps" happens after each N-th completed step, so at indices
N - 1, 2N - 1, ..., and after the last step whatever N is (the run's final loss, evaluation, memory and
checkpoint are always there). A checkpoint taken after index N - 1 holds N completed steps (``step-N``).
The training metrics also count the first step (``first``): the loss a run starts from. Partitions are
requested N steps after the previous request instead (``orchestrator.partitioning.schedule``), since a request
never overlaps the one in flight.
"""

from __future__ import annotations


def due(step: int, every: int, last_step: int, first: bool = False) -> bool:
    """Whether step index `step` is one of every `every`-th (0: only the last, and the first with `first`)."""
    return step == last_step or (first and step == 0) or (every > 0 and (step + 1) % every == 0)

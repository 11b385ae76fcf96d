"""This process's place in the job's worker group, decided once per session and asked everywhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    """One trainer's rank: what it does alone (logging, the side jobs' actors, the checkpoint's shared files)
    follows from ``leads``, and nowhere else compares a rank with 0."""

    index: int
    world_size: int = 1

    @property
    def leads(self) -> bool:
        """Rank 0: the one rank that logs to MLflow, talks to the side jobs' actors and writes shared files."""
        return self.index == 0

"""The live progress display's source: rank 0 posts a snapshot per step to a tiny actor; the driver draws it
(``orchestrator.console``).

Ray Train v2 has no per-step callback on the driver, and worker stdout arrives prefixed and unordered (and, by
default, in the log file rather than on the terminal), so the driver polls a zero-CPU actor instead: one
fire-and-forget call per step on rank 0, nothing on the others. Rank 0 also posts notes for the user (a
partition version adopted, circuit results, a warning) as they happen, a few per run.
"""

from __future__ import annotations

import ray

from orchestrator.priority import lower_priority


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds the latest snapshot (step, loss, clusterability, tokens/s) that rank 0 posted, and its notes."""

    def __init__(self):
        lower_priority()  # a post per step from rank 0 must not pre-empt the ranks
        self._latest: dict | None = None
        self._notes: list[str] = []

    def post(self, snapshot: dict) -> None:
        self._latest = snapshot

    def latest(self) -> dict | None:
        return self._latest

    def note(self, text: str) -> None:
        self._notes.append(text)

    def read(self, notes_seen: int) -> tuple[dict | None, list[str]]:
        """The latest snapshot and the notes after the first ``notes_seen``: one call per driver poll."""
        return self._latest, self._notes[notes_seen:]

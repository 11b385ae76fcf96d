"""The live progress line: rank 0 posts a snapshot per step to a tiny actor; the driver draws it.

Ray Train v2 has no per-step callback on the driver, and worker stdout arrives prefixed and unordered, so
the driver polls a zero-CPU actor instead: one fire-and-forget call per step on rank 0, nothing on the others.
"""

from __future__ import annotations

import sys
import threading
import time

import ray

from orchestrator.priority import lower_priority


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds the latest snapshot (step, loss, clusterability, tokens/s) that rank 0 posted."""

    def __init__(self):
        lower_priority()  # a post per step from rank 0 must not pre-empt the ranks
        self._latest: dict | None = None

    def post(self, snapshot: dict) -> None:
        self._latest = snapshot

    def latest(self) -> dict | None:
        return self._latest


def format_progress(snapshot: dict, total_steps: int) -> str:
    parts = [
        f"step {snapshot['step'] + 1}/{total_steps}",
        f"loss {snapshot['loss']:.4f}",
        f"task {snapshot['task_loss']:.4f}",
    ]
    if snapshot.get("clusterability") is not None:
        parts.append(f"C {snapshot['clusterability']:.3f}")
    if snapshot.get("accuracy") is not None:
        parts.append(f"acc {snapshot['accuracy']:.3f}")
    if snapshot.get("samples_per_s") is not None:
        parts.append(f"{snapshot['samples_per_s']:,.0f} samples/s")
    else:
        parts.append(f"{snapshot['tokens_per_s']:,.0f} tok/s")
    return " | ".join(parts)


class ProgressLine:
    """Draws the board's snapshot on the terminal until stopped: in place on a TTY, a line every few seconds
    otherwise."""

    def __init__(self, board, total_steps: int, interval_s: float = 0.5, plain_interval_s: float = 5.0):
        self._board = board
        self._total_steps = total_steps
        self._interactive = sys.stdout.isatty()
        self._interval_s = interval_s if self._interactive else plain_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw_forever, name="xcm-progress", daemon=True)
        self._last_step = -1

    def __enter__(self) -> ProgressLine:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self._draw()
        if self._interactive and self._last_step >= 0:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _draw_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._draw()

    def _draw(self) -> None:
        try:
            snapshot = ray.get(self._board.latest.remote(), timeout=5)
        except Exception:
            return
        if snapshot is None or snapshot["step"] == self._last_step:
            return
        self._last_step = snapshot["step"]
        line = format_progress(snapshot, self._total_steps)
        if self._interactive:
            sys.stdout.write("\r\033[K" + line)
        else:
            sys.stdout.write(f"[xcm {time.strftime('%H:%M:%S')}] {line}\n")
        sys.stdout.flush()

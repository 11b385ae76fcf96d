"""Ctrl-C while the workers train: stop cleanly, keeping a checkpoint that is only seconds away.

The first Ctrl-C stops the run at once unless a checkpoint is due within ``CHECKPOINT_GRACE_S`` at the pace the
driver has seen; then it waits until that checkpoint is written (at most ``CHECKPOINT_WAIT_LIMIT_S``) and stops.
A second Ctrl-C stops at once. Stopping is a KeyboardInterrupt on the driver's main thread: the MLflow run ends
KILLED (``launch.ending_run``) and the resume command is printed (``launch.resume_hint``). The driver alone
decides; the workers are never asked, so nothing is added to the step path.
"""

from __future__ import annotations

import signal
import threading
import time

from orchestrator.spec import JobSpec
from orchestrator.train.due import due

CHECKPOINT_GRACE_S = 5.0
CHECKPOINT_WAIT_LIMIT_S = 60.0  # from the Ctrl-C: the steps up to it, the checkpoint's write and its report


class StopOnInterrupt:
    """xcm's SIGINT handler for the duration of ``fit`` (main thread only; elsewhere Python keeps its own)."""

    def __init__(self, console, display, spec: JobSpec, run_directory: str):
        self._console = console
        self._display = display
        self._spec = spec
        self._run_directory = run_directory
        self._awaited_step: int | None = None
        self._deadline = 0.0
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._interrupted)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _interrupted(self, signum, frame) -> None:
        if self._awaited_step is not None:
            self._console.say("xcm: stopping now")
            raise KeyboardInterrupt
        soon = self.checkpoint_due_soon()
        if soon is None:
            self._console.say("xcm: stopping")
            raise KeyboardInterrupt
        step, in_s = soon
        self._awaited_step, self._deadline = step, time.monotonic() + CHECKPOINT_WAIT_LIMIT_S
        self._console.say(
            f"xcm: stopping after the checkpoint at step {step + 1}, due in ~{max(in_s, 1):.0f} s "
            "(Ctrl-C again to stop now)"
        )

    def checkpoint_due_soon(self) -> tuple[int, float] | None:
        """The step index of the next checkpoint and the seconds until it, when that is within the grace."""
        latest, pace = self._display.latest, self._display.seconds_per_step
        if latest is None or pace is None:
            return None
        step, last = latest["step"], self._spec.training.steps - 1
        upcoming = next((index for index in range(step + 1, last + 1) if self._checkpoint_due(index)), None)
        if upcoming is None:
            return None
        in_s = (upcoming - step) * pace
        return (upcoming, in_s) if in_s <= CHECKPOINT_GRACE_S else None

    def _checkpoint_due(self, index: int) -> bool:
        return due(index, self._spec.checkpointing.every_steps, self._spec.training.steps - 1)

    def check(self) -> None:
        """Called on the main thread between waits: stop once the awaited checkpoint is written, or too late."""
        if self._awaited_step is None:
            return
        if time.monotonic() > self._deadline:
            self._console.say("xcm: the checkpoint did not come in time: stopping without it")
            raise KeyboardInterrupt
        written = self._written_since(self._awaited_step)
        if written is not None:
            self._console.say(f"xcm: checkpoint at step {written} written: stopping")
            raise KeyboardInterrupt

    def _written_since(self, step: int) -> int | None:
        """The newest checkpoint in the run directory that holds step index ``step`` or later and verifies (its
        completed steps), or None. Any later one counts: a slow poll may find the awaited one rotated out."""
        import pyarrow.fs as pafs

        from orchestrator.train import checkpoint_store as store

        latest = self._display.latest
        if latest is None or latest["step"] < step:
            return None
        place = store.resolve(self._run_directory)
        listing = place.filesystem.get_file_info(pafs.FileSelector(place.path, allow_not_found=True))
        names = sorted(
            (
                info.base_name
                for info in listing
                if info.type == pafs.FileType.Directory
                and info.base_name.startswith(store.CHECKPOINT_PREFIX)
                and store.name_order(info.base_name) >= (step + 1, 0)
            ),
            key=store.name_order,
        )
        for name in reversed(names):
            if store.problem(place.filesystem, f"{place.path}/{name}") is None:
                return store.name_parts(name).step
        return None

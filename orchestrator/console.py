"""What ``xcm run`` shows on the terminal: xcm's own lines and a live progress display; everything else (Ray's
worker lines, DeepSpeed's build output, library warnings) goes to a log file in the run's directory.

The separation is made at the file descriptors: the driver's stdout and stderr point at the log file, so every
writer (Python, Ray's C++ core, the worker output Ray forwards to the driver, child processes) lands there, and
xcm writes its lines to a duplicate of the terminal taken before. ``--verbose`` (or ``XCM_VERBOSE=1``) leaves
the descriptors alone and shows everything live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

VERBOSE_VARIABLE = "XCM_VERBOSE"
LOG_NAME = "xcm.log"
MIN_BAR_WIDTH, MAX_BAR_WIDTH = 8, 30
_CLEAR_LINE = "\r\033[K"


def verbose_requested(flag: bool) -> bool:
    """``--verbose``, or ``XCM_VERBOSE`` set to anything but empty or 0."""
    return flag or os.environ.get(VERBOSE_VARIABLE, "").strip() not in ("", "0")


class Console:
    """xcm's lines on the terminal. On a TTY one live line (the progress bar) stays at the bottom: a line said
    meanwhile is printed above it. Safe to call from the progress thread and the main thread at once."""

    def __init__(self, stream: TextIO, log_path: Path | None = None):
        self.stream = stream
        self.log_path = log_path
        self.interactive = stream.isatty()
        self._live = ""
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            if self._live:
                self.stream.write(_CLEAR_LINE)
            self.stream.write(text + "\n")
            if self._live:
                self.stream.write(self._live)
            self.stream.flush()

    def warn(self, text: str) -> None:
        self.say(f"xcm: warning: {text}")

    @property
    def width(self) -> int:
        """The terminal's columns (the terminal's own descriptor: fd 1 may be the log file); 120 when unknown."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 120
        except (OSError, ValueError):
            return 120

    def live(self, text: str) -> None:
        """Replace the live line (TTY only; elsewhere callers print plain lines with ``say``)."""
        if not self.interactive:
            return
        with self._lock:
            self._live = text[: max(self.width - 1, 20)]
            self.stream.write(_CLEAR_LINE + self._live)
            self.stream.flush()

    def end_live(self) -> None:
        """Leave the live line where it is and go on below it."""
        with self._lock:
            if self._live:
                self.stream.write("\n")
                self.stream.flush()
            self._live = ""

    def keep_log_in(self, directory: Path) -> None:
        """Move the log file (open, and still written) into ``directory`` once the run's directory is known; where
        it cannot go (another filesystem) it stays where it is."""
        if self.log_path is None:
            return
        target = directory / LOG_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            os.replace(self.log_path, target)
        except OSError:
            return
        with contextlib.suppress(OSError):  # the directory of logs not yet placed, when nothing else is in it
            self.log_path.parent.rmdir()
        self.log_path = target


@contextlib.contextmanager
def terminal_session(verbose: bool, log_directory: Path) -> Iterator[Console]:
    """The console of one command: quiet (everything but xcm's lines into a log file under ``log_directory``,
    until the run's directory takes it) or, verbose, everything on the terminal as it comes."""
    if verbose:
        yield Console(sys.stdout)
        return
    made = [directory for directory in (log_directory, *log_directory.parents) if not directory.exists()]
    log_directory.mkdir(parents=True, exist_ok=True)
    log_path = log_directory / f"xcm-{os.getpid()}.log"
    try:
        with _descriptors_into(log_path) as terminal, _warnings_shown(Console(terminal, log_path)) as console:
            try:
                yield console
            except Exception:
                console.end_live()
                sys.stdout.flush()
                sys.stderr.flush()
                if console.log_path.stat().st_size:
                    console.say(f"xcm: failed; the output of Ray, DeepSpeed and the workers is in {console.log_path}")
                raise
    finally:
        _remove_if_unused(log_path, made)


def _remove_if_unused(log_path: Path, made: list[Path]) -> None:
    """A command that stopped before anything wrote to its log (a refused key file, a finished run to resume)
    leaves no log behind, nor the directories made for it."""
    with contextlib.suppress(OSError):
        if log_path.stat().st_size == 0:
            log_path.unlink()
    for directory in made:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def _descriptors_into(log_path: Path) -> Iterator[TextIO]:
    """Point fds 1 and 2 at ``log_path`` for the block; yield a text stream on the original stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", encoding=sys.stdout.encoding or "utf-8", errors="replace")
    with log_path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
            terminal.close()


class _ConsoleHandler(logging.Handler):
    """xcm's own warnings on the driver (an MLflow store that refused a write, a checkpoint skipped) reach the
    user; Python's last-resort handler would have sent them to stderr, now the log file."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        self._console.warn(record.getMessage())


@contextlib.contextmanager
def _warnings_shown(console: Console) -> Iterator[Console]:
    """The ``orchestrator`` loggers' warnings on the console, and (with their origin) on stderr, the log file."""
    package = logging.getLogger("orchestrator")
    handlers = [_ConsoleHandler(console), logging.StreamHandler(sys.stderr)]
    handlers[1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers[1].setLevel(logging.WARNING)
    for handler in handlers:
        package.addHandler(handler)
    try:
        yield console
    finally:
        for handler in handlers:
            package.removeHandler(handler)


def format_duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_bar(done: int, total: int, width: int) -> str:
    filled = round(width * min(done / total, 1.0)) if total > 0 else width
    return "█" * filled + "·" * (width - filled)


def format_progress(snapshot: dict, total_steps: int, eta_s: float | None, bar_width: int = 0) -> str:
    """One progress line: step/total (with a bar of ``bar_width`` and the percentage when given), loss, task
    loss, C, accuracy, rate, ETA."""
    done = snapshot["step"] + 1
    head = f"step {done}/{total_steps}"
    if bar_width > 0:
        head += f" {progress_bar(done, total_steps, bar_width)} {100 * done // max(total_steps, 1):3d}%"
    parts = [head, f"loss {snapshot['loss']:.4f}", f"task {snapshot['task_loss']:.4f}"]
    if snapshot.get("clusterability") is not None:
        parts.append(f"C {snapshot['clusterability']:.3f}")
    if snapshot.get("accuracy") is not None:
        parts.append(f"acc {snapshot['accuracy']:.3f}")
    if snapshot.get("samples_per_s") is not None:
        parts.append(f"{snapshot['samples_per_s']:,.0f} samples/s")
    elif snapshot.get("tokens_per_s") is not None:
        parts.append(f"{snapshot['tokens_per_s']:,.0f} tok/s")
    if eta_s is not None and done < total_steps:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class ProgressDisplay:
    """Polls the progress board (``orchestrator.train.progress``) from a driver thread: the latest snapshot as a
    live bar on a TTY or a plain line every ``plain_interval_s`` elsewhere, and each note (a partition version,
    circuit results, a warning from rank 0) as a line of its own when it arrives. Before the first step it says
    what the run waits for."""

    def __init__(
        self,
        console: Console,
        board,
        total_steps: int,
        waiting_for: str = "starting the workers",
        interval_s: float = 0.5,
        plain_interval_s: float = 5.0,
    ):
        self._console = console
        self._board = board
        self._total_steps = total_steps
        self._waiting_for = waiting_for
        self._interval_s = interval_s
        self._plain_interval_s = plain_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, name="xcm-progress", daemon=True)
        self._started = time.monotonic()
        self._notes_seen = 0
        self._last_drawn_step = -1
        self._last_plain = float("-inf")
        self._first_seen: tuple[float, int] | None = None
        self.latest: dict | None = None

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll(final=True)
        self._console.end_live()

    @property
    def seconds_per_step(self) -> float | None:
        """The mean step time the driver has seen since the first snapshot; None before two snapshots."""
        if self._first_seen is None or self.latest is None or self.latest["step"] <= self._first_seen[1]:
            return None
        seen_at, first_step = self._first_seen
        return (time.monotonic() - seen_at) / (self.latest["step"] - first_step)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()

    def poll(self, final: bool = False) -> None:
        import ray

        try:
            snapshot, notes = ray.get(self._board.read.remote(self._notes_seen), timeout=5)
        except Exception:  # the board is gone (the run is ending) or slow: the next poll tries again
            return
        self._notes_seen += len(notes)
        for note in notes:
            self._console.say(f"xcm: {note}")
        if snapshot is None:
            self._console.live(f"xcm: {self._waiting_for}… {format_duration(time.monotonic() - self._started)}")
            return
        self._show(snapshot, final)

    def _show(self, snapshot: dict, final: bool) -> None:
        now = time.monotonic()
        if self._first_seen is None:
            self._first_seen = (now, snapshot["step"])
        self.latest = snapshot
        pace = self.seconds_per_step
        eta = None if pace is None else pace * (self._total_steps - 1 - snapshot["step"])
        line = format_progress(snapshot, self._total_steps, eta)
        if self._console.interactive:
            room = self._console.width - 1 - len(line) - len(" 100%") - 1  # what the bar may take of the line
            if room >= MIN_BAR_WIDTH:
                line = format_progress(snapshot, self._total_steps, eta, min(room, MAX_BAR_WIDTH))
            self._console.live(line)
            return
        new_step = snapshot["step"] != self._last_drawn_step
        if new_step and (final or now - self._last_plain >= self._plain_interval_s):
            self._last_plain, self._last_drawn_step = now, snapshot["step"]
            self._console.say(f"[xcm {time.strftime('%H:%M:%S')}] {line}")

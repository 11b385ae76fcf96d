"""Rank 0's metrics on local disk first and in MLflow second: nothing is lost when either side dies.

``append`` writes a step's metrics to a JSON-lines file before it returns, so a worker killed with ``kill -9``
or restarted by Ray Train has lost nothing it logged; ``unsent``/``mark_sent`` let the sender (another process,
``orchestrator.metric_sender``) work through the file at MLflow's pace, from a byte offset kept beside it
(``<spool>.sent``, replaced atomically). The two processes take an advisory lock (``<spool>.lock``) around every
read or change of the files, but not around a send, which may take seconds. While the tracking server is down
the file grows, up to ``max_unsent_bytes``; past that, new metrics are dropped with a warning (bounded, so a
long outage cannot fill the disk).

The spool never stops training: a write that fails (a full disk, any ``OSError``) drops that step's metrics,
counts them, and the next append tries again; the first line written afterwards carries the count as the metric
``spool/dropped_metrics``. A failed write is cut off again, and where even that fails the next record starts on
a new line, so no fragment merges with a later record. A line that does not parse as a record (a torn write, a
bad disk block, a hand edit) is skipped with a warning and counted, by the writer when it reads the file at
start and by the sender, and the rest of the file is read on.

One writer at a time: a writer holds an exclusive lock on ``<spool>.writer`` for its lifetime (two writers had
interleaved their records and lost and doubled steps). The kernel releases it when the process dies, however it
dies, so a restarted rank 0 takes it over; a second live writer is refused after a short wait (see
``SpoolInUse``).

The file also remembers the last step logged per metric, across restarts and ``xcm resume``: a run that
continues from a checkpoint recomputes the steps after it, and ``append`` drops the ones already logged, so
every step appears once in MLflow. A spool out of reach of the node that resumes (a machine-local one, when the
checkpoints are on remote storage) is carried over by the checkpoints instead: each keeps the lines unsent when it
was written (``copy_unsent``), the resumed run spools them again (``import_unsent``), and takes the latest step
MLflow holds of each metric as logged (``remember_logged``). Once the sent part of the file is large, the writer
replaces it by that memory (one ``{"last_steps": ...}`` line) before its next append, keeping the unsent rest.
Only the writer compacts (its append handle would otherwise write into the replaced file), so a batch the sender
is sending meanwhile was read at the file's previous *generation*: the sent marker keeps the generation and how
far the compaction moved the bytes, and ``mark_sent`` translates the sender's offset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import posixpath
import re
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

DROPPED_METRICS = "spool/dropped_metrics"  # metrics this rank 0 could not spool (disk full, or the bound reached)

# A restarted rank 0 may start while Ray is still tearing its predecessor down; the lock is free once that
# process has exited. A writer still there after this long is another live run on the same spool.
WRITER_WAIT_S = 30.0

_MAX_INT64 = 2**63 - 1
# MLflow's rule for metric names (mlflow.utils.validation): a name it refuses would fail the sender's whole batch.
_METRIC_NAME = re.compile(r"[/\w.\- :]{1,250}")
_TAIL_CHUNK = 1 << 16


class SpoolInUse(RuntimeError):
    """Another live process writes this spool; two writers interleave their records and lose or double steps."""


class SentMarker(NamedTuple):
    """How far the sender got: a byte offset into the file's ``generation`` (one more at every compaction), and
    how far the last compaction moved the bytes (new offset = old offset + shift)."""

    offset: int
    generation: int
    shift: int


class MetricSpool:
    """An append-only JSON-lines file of ``{"step", "timestamp", "metrics"}`` records and a sent offset.

    One process writes (``writer=True``: ``append``); the sender opens the same path with ``writer=False`` and
    only reads and marks records sent.
    """

    def __init__(
        self,
        path: Path,
        max_unsent_bytes: int = 256 << 20,
        compact_bytes: int = 8 << 20,
        writer: bool = True,
        writer_wait_s: float = WRITER_WAIT_S,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_lock = (
            _hold_writer_lock(self.path.with_name(self.path.name + ".writer"), writer_wait_s) if writer else None
        )
        self._sent_path = self.path.with_name(self.path.name + ".sent")
        self._lock_file = self.path.with_name(self.path.name + ".lock").open("a")  # held open: locked every step
        self._max_unsent_bytes = max_unsent_bytes
        self._compact_bytes = compact_bytes
        self._thread_lock = threading.Lock()
        self.dropped = 0  # metrics not spooled, since this writer started
        self._dropped_logged = 0  # ... of which the count is in the file
        self._dropping = False
        self.skipped_lines = 0  # lines that were not records, skipped by this reader
        self._read_until = (0, 0)  # (generation, offset) ``unsent`` has read to: skipped lines before it are counted
        self._last_step = -1  # the latest step appended or dropped
        self.last_steps: dict[str, int] = {}
        self._file = None
        if not writer:
            return
        with self._locked():
            _drop_torn_tail(self.path)
            for record in self._records():
                for key, step in record.get("last_steps", {}).items():
                    self.last_steps[key] = max(step, self.last_steps.get(key, -1))
                for key in record.get("metrics", {}):
                    self.last_steps[key] = max(record["step"], self.last_steps.get(key, -1))

    def append(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        """Record the metrics of ``step`` not logged before (durable once this returns, short of a machine crash);
        when the disk refuses them, count them as dropped and return (the next append tries again)."""
        fresh = {key: float(value) for key, value in metrics.items() if step > self.last_steps.get(key, -1)}
        if not fresh:
            return
        self._last_step = max(self._last_step, step)
        if self.dropped > self._dropped_logged and step > self.last_steps.get(DROPPED_METRICS, -1):
            fresh[DROPPED_METRICS] = float(self.dropped)
        line = (json.dumps({"step": step, "timestamp": timestamp_ms, "metrics": fresh}) + "\n").encode()
        try:
            with self._locked():
                sent = self._read_marker().offset
                if sent > self._compact_bytes:
                    self._compact()
                    sent = self._read_marker().offset
                if self._size() - sent + len(line) > self._max_unsent_bytes:
                    self._drop(fresh, f"{self._max_unsent_bytes >> 20} MB unsent: the tracking server is behind")
                    return
                self._write_line(line)
        except OSError as error:
            self._drop(fresh, f"{type(error).__name__}: {error}")
            return
        if self._dropping:
            logger.warning(
                "metric spool %s writes again; %d metrics were dropped (logged as %s)",
                self.path,
                self.dropped,
                DROPPED_METRICS,
            )
            self._dropping = False
        self._dropped_logged = int(fresh.get(DROPPED_METRICS, self._dropped_logged))
        for key in fresh:
            self.last_steps[key] = step

    def unsent(self, max_metrics: int) -> tuple[list[dict], SentMarker]:
        """The oldest unsent records, about ``max_metrics`` metrics in all, and the marker just past them (and past
        any line that is not a record, skipped with a warning). A torn last line is left where it is: its writer
        may yet finish it, or the next writer cuts it."""
        with self._locked():
            marker = self._read_marker()
            offset, records, count = marker.offset, [], 0
            if not self.path.exists():
                return [], marker
            with self.path.open("rb") as stream:
                stream.seek(offset)
                for line in stream:
                    if not line.endswith(b"\n"):
                        break
                    record = self._parse(line, offset, first_read=(marker.generation, offset) >= self._read_until)
                    size = len(record.get("metrics", {})) if record else 0
                    if records and count + size > max_metrics:
                        break
                    if record:
                        records.append(record)
                    count += size
                    offset += len(line)
            self._read_until = max(self._read_until, (marker.generation, offset))
            return [record for record in records if "metrics" in record], marker._replace(offset=offset)

    def mark_sent(self, marker: SentMarker) -> None:
        """Everything before ``marker`` (from ``unsent``) reached the tracking store."""
        with self._locked():
            current = self._read_marker()
            if marker.generation == current.generation - 1:  # compacted while the batch was being sent
                marker = current._replace(offset=marker.offset + current.shift)
            elif marker.generation != current.generation:
                return  # older still (cannot happen: compaction needs the sender to have marked 8 MB sent)
            if marker.offset > current.offset:
                self._write_marker(marker)

    def pending(self) -> bool:
        """Whether a whole line waits to be sent (a torn last line does not count)."""
        with self._locked():
            sent = self._read_marker().offset
            return self._end_of_whole_lines(sent) > sent

    def unlogged_drops(self) -> tuple[float, int] | None:
        """``(dropped metrics, latest step)`` when the spool could not record its latest count of dropped metrics
        (it never wrote again): for the logger to send directly. None when every drop is counted in the file."""
        if self.dropped == self._dropped_logged:
            return None
        return float(self.dropped), self._last_step

    def copy_unsent(self, destination: Path) -> bool:
        """Copy the whole lines not yet sent to ``destination``, for a checkpoint to keep: a run resumed on another
        node, where this spool is out of reach, sends them from there (``import_unsent``). False, and nothing
        written, when everything was sent."""
        with self._locked():
            start = self._read_marker().offset
            end = self._end_of_whole_lines(start)
            if end <= start:
                return False
            with self.path.open("rb") as source, destination.open("wb") as target:
                source.seek(start)
                while start < end:
                    chunk = source.read(min(_TAIL_CHUNK, end - start))
                    target.write(chunk)
                    start += len(chunk)
        return True

    def import_unsent(self, source: Path) -> int:
        """Spool the records a checkpoint kept unsent (``copy_unsent``), with their own timestamps, so that MLflow
        stores a record that the dead run did send after all only once; the steps this spool already holds are
        skipped as in ``append``. Lines that are not records are skipped and counted, and no more than the
        unsent bound is read. The number of records spooled."""
        spooled = 0
        with source.open("rb") as stream:
            for offset, line in _bounded_lines(stream, self._max_unsent_bytes):
                record = self._parse(line, offset)
                if record is not None and "metrics" in record:
                    self.append(record["metrics"], record["step"], record["timestamp"])
                    spooled += 1
        return spooled

    def remember_logged(self, last_steps: dict[str, int]) -> None:
        """Take the latest step that the tracking store holds of each metric as logged: a resumed run on a node
        without this run's spool then does not log again the steps the dead run sent after its checkpoint."""
        for key, step in last_steps.items():
            if _is_metric_name(key) and _is_count(step):
                self.last_steps[key] = max(step, self.last_steps.get(key, -1))

    def close(self) -> None:
        """Release the files (and the writer lock)."""
        if self.dropped:
            logger.warning(
                "metric spool %s dropped %d metrics in all (disk full, or the bound reached)", self.path, self.dropped
            )
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer_lock is not None:
            self._writer_lock.close()  # releases the writer lock
            self._writer_lock = None
        self._lock_file.close()

    @contextlib.contextmanager
    def _locked(self):
        """This process's threads, then the other process (an advisory lock on ``<spool>.lock``)."""
        with self._thread_lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _drop(self, metrics: dict[str, float], reason: str) -> None:
        """Count metrics that could not be spooled; warn when dropping starts (again)."""
        if not self._dropping:
            logger.warning(
                "metric spool %s cannot take metrics (%s): training goes on, new metrics are dropped "
                "and counted until it can",
                self.path,
                reason,
            )
            self._dropping = True
        self.dropped += sum(key != DROPPED_METRICS for key in metrics)

    def _write_line(self, line: bytes) -> None:
        """Append one whole line or nothing: a write that fails part-way is cut off again. Where a fragment is
        left all the same (the cut failed too), the line starts on a new line, so the fragment stays one bad line
        that readers skip instead of swallowing this record."""
        if self._file is None:
            self._file = self.path.open("a+b", buffering=0)  # readable too: the last byte is checked
        start = os.fstat(self._file.fileno()).st_size
        if start and os.pread(self._file.fileno(), 1, start - 1) != b"\n":
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += self._file.write(line[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), start)
            raise

    def _parse(self, line: bytes, offset: int, first_read: bool = True) -> dict | None:
        """The record on a line, or None when the line is not one: warned and counted the first time it is read
        (the sender reads a batch again after a failed send)."""
        record = _record(line)
        if record is None and first_read:
            self.skipped_lines += 1
            if _is_power_of_ten(self.skipped_lines):
                logger.warning(
                    "metric spool %s: skipped a line that is not a metric record at byte %d (%d skipped so far): %.80r",
                    self.path,
                    offset,
                    self.skipped_lines,
                    line,
                )
        return record

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _end_of_whole_lines(self, start: int) -> int:
        """Where the file's last whole line ends, searching back no further than ``start``."""
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return start
        with stream:
            position = stream.seek(0, os.SEEK_END)
            while position > start:
                chunk_start = max(start, position - _TAIL_CHUNK)
                stream.seek(chunk_start)
                newline = stream.read(position - chunk_start).rfind(b"\n")
                if newline >= 0:
                    return chunk_start + newline + 1
                position = chunk_start
            return start

    def _read_marker(self) -> SentMarker:
        """The sent marker, checked against the generation that the file's memory line names: a compaction that
        crashed between replacing the file and the marker leaves a marker of the previous generation, and then
        everything after the memory line counts as unsent (resending is harmless)."""
        generation, memory_length = self._file_generation()
        try:
            marker = SentMarker(*json.loads(self._sent_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError, RecursionError):
            marker = None
        if (
            marker is None
            or not all(_is_count(value) for value in marker)
            or marker.generation != generation
            or marker.offset > self._size()
        ):
            return SentMarker(memory_length, generation, 0)
        return marker

    def _file_generation(self) -> tuple[int, int]:
        """The generation named by the file's memory line and that line's length; (0, 0) before any compaction
        (or when that line does not parse: then everything is read and the bad line skipped)."""
        try:
            with self.path.open("rb") as stream:
                first = stream.readline()
        except FileNotFoundError:
            return 0, 0
        record = _record(first) if first.startswith(b'{"last_steps"') else None
        if record is None or "last_steps" not in record:
            return 0, 0
        return record["generation"], len(first)

    def _write_marker(self, marker: SentMarker) -> None:
        _replace(self._sent_path, json.dumps(list(marker)))

    def _compact(self) -> None:
        """Replace the sent part of the file by the memory line, keeping the unsent rest (under the lock). A
        failure before the replacement leaves the file as it was; after it, the next append reopens the file."""
        marker = self._read_marker()
        generation = marker.generation + 1
        memory = (json.dumps({"last_steps": self.last_steps, "generation": generation}) + "\n").encode()
        with self.path.open("rb") as stream:
            stream.seek(marker.offset)
            rest = stream.read()
        _replace(self.path, memory + rest)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._write_marker(SentMarker(len(memory), generation, len(memory) - marker.offset))

    def _records(self):
        if not self.path.exists():
            return
        with self.path.open("rb") as stream:
            offset = 0
            for line in stream:
                record = self._parse(line, offset)
                offset += len(line)
                if record is not None:
                    yield record


def _hold_writer_lock(path: Path, wait_s: float):
    """The open lock file, exclusively locked for this process, or ``SpoolInUse`` after ``wait_s`` of trying.

    Refused rather than waited for without end: the other writer is a run that lives for hours, and a rank 0
    stuck here would hold its whole worker group idle without a word."""
    lock = path.open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                lock.close()
                raise SpoolInUse(
                    f"metric spool {path.with_suffix('')} is written by another process ({holder}), still there "
                    f"after {wait_s:.0f} s: two writers would lose and double steps. Stop the other run of this "
                    "MLflow run first, then resume this one."
                ) from None
            time.sleep(0.2)
    with contextlib.suppress(OSError):  # the holder's name serves only the message above
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
    return lock


def _bounded_lines(stream, limit: int):
    """``(offset, line)`` of a binary stream's whole lines within its first ``limit`` bytes."""
    offset = 0
    while offset < limit:
        line = stream.readline(limit - offset)  # never more than the bound, however long a line is
        if not line.endswith(b"\n"):
            return
        yield offset, line
        offset += len(line)


def _record(line: bytes) -> dict | None:
    """A metrics record or the memory line, of exactly the shape the writer writes; None for anything else."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's recursion limit
        return None
    if not isinstance(record, dict):
        return None
    if record.keys() == {"step", "timestamp", "metrics"}:
        valid = (
            _is_count(record["step"])
            and _is_count(record["timestamp"])
            and isinstance(record["metrics"], dict)
            and all(_is_metric_name(key) and _is_number(value) for key, value in record["metrics"].items())
        )
    elif record.keys() == {"last_steps", "generation"}:
        valid = (
            _is_count(record["generation"])
            and isinstance(record["last_steps"], dict)
            and all(_is_metric_name(key) and _is_count(step) for key, step in record["last_steps"].items())
        )
    else:
        valid = False
    return record if valid else None


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT64


def _is_number(value) -> bool:
    return type(value) is float or (type(value) is int and abs(value) <= _MAX_INT64)


def _is_metric_name(name) -> bool:
    return (
        isinstance(name, str)
        and _METRIC_NAME.fullmatch(name) is not None
        and posixpath.normpath(name) == name
        and not name.startswith(("..", "/"))
        and name != "."
    )


def _is_power_of_ten(count: int) -> bool:
    return math.log10(count).is_integer()


def _drop_torn_tail(path: Path) -> None:
    """A process killed mid-write leaves a partial last line: cut it, the rest of the file is whole."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as stream:
            stream.truncate(data.rfind(b"\n") + 1)


def _replace(path: Path, content: str | bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_bytes(content if isinstance(content, bytes) else content.encode())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise

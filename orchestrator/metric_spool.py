"""Rank 0's metrics on local disk first and in MLflow second: nothing is lost when either side dies.

``append`` writes a step's metrics to a JSON-lines file before it returns, so a worker killed with ``kill -9``
or restarted by Ray Train has lost nothing it logged; ``unsent``/``mark_sent`` let the sender (another process,
``orchestrator.metric_sender``) work through the file at MLflow's pace, from a byte offset kept beside it
(``<spool>.sent``, replaced atomically). The two processes take an advisory lock (``<spool>.lock``) around every
read or change of the files, but not around a send, which may take seconds. While the tracking server is down
the file grows, up to ``max_unsent_bytes``; past that, new metrics are dropped with a warning (bounded, so a
long outage cannot fill the disk).

The file also remembers the last step logged per metric, across restarts and ``xcm resume``: a run that
continues from a checkpoint recomputes the steps after it, and ``append`` drops the ones already logged, so
every step appears once in MLflow. Once the sent part of the file is large, the writer replaces it by that
memory (one ``{"last_steps": ...}`` line) before its next append, keeping the unsent rest. Only the writer
compacts (its append handle would otherwise write into the replaced file), so a batch the sender is sending
meanwhile was read at the file's previous *generation*: the sent marker keeps the generation and how far the
compaction moved the bytes, and ``mark_sent`` translates the sender's offset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)


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

    def __init__(self, path: Path, max_unsent_bytes: int = 256 << 20, compact_bytes: int = 8 << 20,
                 writer: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sent_path = self.path.with_name(self.path.name + ".sent")
        self._lock_file = self.path.with_name(self.path.name + ".lock").open("a")  # held open: locked every step
        self._max_unsent_bytes = max_unsent_bytes
        self._compact_bytes = compact_bytes
        self._thread_lock = threading.Lock()
        self._dropped = 0
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
            self._file = self.path.open("ab")

    def append(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        """Record the metrics of ``step`` not logged before (durable once this returns, short of a machine crash)."""
        fresh = {key: float(value) for key, value in metrics.items() if step > self.last_steps.get(key, -1)}
        if not fresh:
            return
        line = (json.dumps({"step": step, "timestamp": timestamp_ms, "metrics": fresh}) + "\n").encode()
        with self._locked():
            sent = self._read_marker().offset
            if sent > self._compact_bytes:
                self._compact()
                sent = self._read_marker().offset
            if self._size() - sent + len(line) > self._max_unsent_bytes:
                if not self._dropped:
                    logger.warning("metric spool %s is full (%d MB unsent): dropping new metrics until the "
                                   "tracking server catches up", self.path, self._max_unsent_bytes >> 20)
                self._dropped += len(fresh)
                return
            self._file.write(line)
            self._file.flush()
        for key in fresh:
            self.last_steps[key] = step

    def unsent(self, max_metrics: int) -> tuple[list[dict], SentMarker]:
        """The oldest unsent records, about ``max_metrics`` metrics in all, and the marker just past them."""
        with self._locked():
            marker = self._read_marker()
            offset, records, count = marker.offset, [], 0
            if not self.path.exists():
                return [], marker
            with self.path.open("rb") as stream:
                stream.seek(offset)
                for line in stream:
                    record = json.loads(line)
                    if records and count + len(record.get("metrics", {})) > max_metrics:
                        break
                    records.append(record)
                    count += len(record.get("metrics", {}))
                    offset += len(line)
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
        with self._locked():
            return self._size() > self._read_marker().offset

    def close(self) -> None:
        if self._dropped:
            logger.warning("metric spool %s dropped %d metrics while full", self.path, self._dropped)
        if self._file is not None:
            self._file.close()
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

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_marker(self) -> SentMarker:
        """The sent marker, checked against the generation that the file's memory line names: a compaction that
        crashed between replacing the file and the marker leaves a marker of the previous generation, and then
        everything after the memory line counts as unsent (resending is harmless)."""
        generation, memory_length = self._file_generation()
        try:
            marker = SentMarker(*json.loads(self._sent_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            marker = None
        if marker is None or marker.generation != generation or marker.offset > self._size():
            return SentMarker(memory_length, generation, 0)
        return marker

    def _file_generation(self) -> tuple[int, int]:
        """The generation named by the file's memory line and that line's length; (0, 0) before any compaction."""
        try:
            with self.path.open("rb") as stream:
                first = stream.readline()
        except FileNotFoundError:
            return 0, 0
        if not first.startswith(b'{"last_steps"'):
            return 0, 0
        return json.loads(first).get("generation", 0), len(first)

    def _write_marker(self, marker: SentMarker) -> None:
        _replace(self._sent_path, json.dumps(list(marker)))

    def _compact(self) -> None:
        """Replace the sent part of the file by the memory line, keeping the unsent rest (under the lock)."""
        marker = self._read_marker()
        generation = marker.generation + 1
        memory = (json.dumps({"last_steps": self.last_steps, "generation": generation}) + "\n").encode()
        with self.path.open("rb") as stream:
            stream.seek(marker.offset)
            rest = stream.read()
        self._file.close()
        _replace(self.path, memory + rest)
        self._write_marker(SentMarker(len(memory), generation, len(memory) - marker.offset))
        self._file = self.path.open("ab")

    def _records(self):
        if not self.path.exists():
            return
        with self.path.open("rb") as stream:
            for line in stream:
                yield json.loads(line)


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
    temporary.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.replace(temporary, path)

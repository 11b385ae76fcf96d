"""Rank 0's metrics on local disk first and in MLflow second: nothing is lost when either side dies.

``append`` writes a step's metrics to a JSON-lines file before it returns, so a worker killed with ``kill -9``
or restarted by Ray Train has lost nothing it logged; ``unsent``/``mark_sent`` let the sender work through the
file at MLflow's pace, from a byte offset kept beside it (``<spool>.sent``, replaced atomically). While the
tracking server is down the file grows, up to ``max_unsent_bytes``; past that, new metrics are dropped with a
warning (bounded, so a long outage cannot fill the disk).

The file also remembers the last step logged per metric, across restarts and ``xcm resume``: a run that
continues from a checkpoint recomputes the steps after it, and ``append`` drops the ones already logged, so
every step appears once in MLflow. Once everything is sent and the file is large, it is compacted to that
memory (one ``{"last_steps": ...}`` line).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

class MetricSpool:
    """An append-only JSON-lines file of ``{"step", "timestamp", "metrics"}`` records and a sent offset."""

    def __init__(self, path: Path, max_unsent_bytes: int = 256 << 20, compact_bytes: int = 8 << 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sent_path = self.path.with_name(self.path.name + ".sent")
        self._max_unsent_bytes = max_unsent_bytes
        self._compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._dropped = 0
        _drop_torn_tail(self.path)
        self.last_steps: dict[str, int] = {}
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
        with self._lock:
            if self._file.tell() - self._sent_offset() + len(line) > self._max_unsent_bytes:
                if not self._dropped:
                    logger.warning("metric spool %s is full (%d MB unsent): dropping new metrics until the "
                                   "tracking server catches up", self.path, self._max_unsent_bytes >> 20)
                self._dropped += len(fresh)
                return
            self._file.write(line)
            self._file.flush()
        for key in fresh:
            self.last_steps[key] = step

    def unsent(self, max_metrics: int) -> tuple[list[dict], int]:
        """The oldest unsent records, about ``max_metrics`` metrics in all, and the offset just past them."""
        with self._lock:
            offset = self._sent_offset()
            records, count = [], 0
            with self.path.open("rb") as stream:
                stream.seek(offset)
                for line in stream:
                    record = json.loads(line)
                    if records and count + len(record.get("metrics", {})) > max_metrics:
                        break
                    records.append(record)
                    count += len(record.get("metrics", {}))
                    offset += len(line)
            return [record for record in records if "metrics" in record], offset

    def mark_sent(self, offset: int) -> None:
        """Everything before ``offset`` reached the tracking store; compact the file when that is all of it."""
        with self._lock:
            _replace(self._sent_path, str(offset))
            if offset == self._file.tell() and offset > self._compact_bytes:
                self._compact()

    def pending(self) -> bool:
        with self._lock:
            return self._file.tell() > self._sent_offset()

    def close(self) -> None:
        if self._dropped:
            logger.warning("metric spool %s dropped %d metrics while full", self.path, self._dropped)
        self._file.close()

    def _sent_offset(self) -> int:
        try:
            offset = int(self._sent_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0
        # Larger than the file only after a compaction that crashed before this offset was rewritten:
        # compaction happens only when everything was sent.
        return min(offset, self._file.tell())

    def _compact(self) -> None:
        memory = json.dumps({"last_steps": self.last_steps}) + "\n"
        self._file.close()
        _replace(self.path, memory)
        _replace(self._sent_path, str(len(memory.encode())))
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


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)

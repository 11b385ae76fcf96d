"""Rank 0's metric sender: a separate process, at the lowest priority, that moves the metric spool into MLflow.

Why a process and not a thread of the trainer: sending is SQLAlchemy work, a noticeable share of the CPU a tiny
model's training takes, and inside rank 0 it would hold the GIL that the training thread needs to dispatch every
operator. Rank 0 paces every step of every rank, so each send would stall all of them. In its own process, at the
lowest priority, it takes the CPU the training leaves idle (ranks wait for each other in every all-reduce), as
wandb's service process does for the same reason. The spool on disk is the whole interface between the two.

Started by ``orchestrator.tracking.MetricLogger``; runs until its standard input closes (the logger's ``close``,
or the death of the trainer), then sends what is left, retrying for up to the drain timeout it was given (the
first line on standard input, or ``--drain-timeout`` when the trainer died without one).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading
import time
from pathlib import Path

from orchestrator.metric_spool import MetricSpool
from orchestrator.priority import lower_priority

logger = logging.getLogger("xcm.metric_sender")

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MetricSender:
    """Sends the spool's unsent records in batches; warns once when the store stops answering, once when back."""

    def __init__(self, uri: str, run_id: str, spool_path: Path, interval_s: float):
        from orchestrator.tracking import client

        self._client = client(uri)
        self._run_id = run_id
        self._interval_s = interval_s
        self.spool = MetricSpool(spool_path, writer=False)
        self._outage = False

    def send_pending(self) -> bool:
        """Send everything spooled; True when nothing is left, False when the store refused a batch."""
        from mlflow.entities import Metric

        while self.spool.pending():
            records, offset = self.spool.unsent(MAX_BATCH)
            batch = [
                Metric(key, value, record["timestamp"], record["step"])
                for record in records
                for key, value in record["metrics"].items()
            ]
            try:
                # Resending a batch after a crash is harmless: the spool keeps each metric's timestamp, and
                # MLflow stores an identical (key, value, timestamp, step) once.
                if batch:
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            except Exception as error:
                if not self._outage:
                    logger.warning(
                        "MLflow log_batch failed (%s); training goes on, metrics wait in %s and are retried every %s s",
                        error,
                        self.spool.path,
                        self._interval_s,
                    )
                self._outage = True
                return False
            self.spool.mark_sent(offset)
            if self._outage:
                logger.warning("MLflow is reachable again: sending the metrics held in %s", self.spool.path)
                self._outage = False
        return True


class StopRequest:
    """Set when standard input closes, with the drain timeout the logger wrote first (or the default, when the
    trainer died without a word)."""

    def __init__(self, default_drain_timeout_s: float):
        self.event = threading.Event()
        self.drain_timeout_s = default_drain_timeout_s

    def watch(self, stream) -> None:
        line = stream.readline()  # blocks until the logger closes the pipe
        if line.strip():
            self.drain_timeout_s = float(line)
        self.event.set()


def run(sender: MetricSender, interval_s: float, stop: StopRequest) -> None:
    """Send every ``interval_s`` until asked to stop; then drain for up to the requested timeout."""
    while not stop.event.wait(interval_s):
        sender.send_pending()
    deadline = time.monotonic() + stop.drain_timeout_s
    while not sender.send_pending() and time.monotonic() < deadline:
        time.sleep(interval_s)
    if sender.spool.pending():
        logger.warning(
            "MLflow logger closed with unsent metrics; they stay in %s and are sent when the run is resumed",
            sender.spool.path,
        )
    if sender.spool.skipped_lines:
        logger.warning(
            "skipped %d lines of %s that were not metric records (torn or corrupt)",
            sender.spool.skipped_lines,
            sender.spool.path,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri")
    parser.add_argument("run_id")
    parser.add_argument("spool", type=Path)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between sends")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to keep retrying at the end when the trainer did not say",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[xcm metric sender] %(levelname)s %(message)s")
    lower_priority(19)  # the lowest that still always progresses (SCHED_IDLE could starve)
    stop = StopRequest(args.drain_timeout)
    threading.Thread(target=stop.watch, args=(sys.stdin,), name="stdin-watch", daemon=True).start()
    run(MetricSender(args.uri, args.run_id, args.spool, args.interval), args.interval, stop)


if __name__ == "__main__":
    main()
    # The trainer waits for this exit at the end of every run, and at niceness 19 the interpreter's last garbage
    # collection over MLflow's objects is slow on a busy machine: freeze them so that it skips them.
    gc.freeze()

"""CPU priority: the training ranks first, xcm's helpers in the time the ranks leave.

Ray starts every worker process at niceness 15 (its `worker_niceness`), below its own daemons, the driver and
the dashboard at 0. Where the ranks fill the machine's cores (a laptop, a CI runner), every wake-up of a
niceness-0 process then pre-empts a rank at once, and the other ranks wait for it at the next collective. So
xcm's local Ray starts its workers at 0 (``WORKER_NICENESS``), and the helpers that only report on training
(the progress board, the metric sender) lower themselves with ``lower_priority``. The partitioner actors keep
the ranks' priority: the trainers wait for their partitions, and below the ranks they would get ~3% of a busy
core (a recomputed partition many steps late, the first one holding up the start).
"""

from __future__ import annotations

import contextlib
import os

WORKER_NICENESS = 0  # the training ranks, as a process started outside Ray would run
HELPER_NICENESS = 15  # Ray's default for its workers: below the ranks, still a fair share of an idle core


def lower_priority(niceness: int = HELPER_NICENESS) -> None:
    """Raise the niceness of every thread of this process to `niceness` (never lowers it: that takes privileges).

    Every thread, not the process: Linux keeps a niceness per thread, and a Ray actor's threads exist before
    its constructor runs (a process-wide call would reach only the calling thread there).
    """
    for thread in _threads():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, thread) < niceness:
                os.setpriority(os.PRIO_PROCESS, thread, niceness)


def _threads() -> list[int]:
    """This process's thread ids on Linux; elsewhere 0, which `setpriority` takes as the whole process."""
    try:
        return [int(thread) for thread in os.listdir("/proc/self/task")]
    except FileNotFoundError:
        return [0]

"""Which processes and threads take the CPU while a job trains: every process's (and thread's) share of one core
over a window, read from ``/proc`` (Linux), largest first.

    python bench/throughput.py --variants xcm-on --rounds 1 &
    python bench/cpu_share.py 38 20        # wait 38 s (start-up), then sample 20 s of steady training

Where the ranks fill the machine's cores, any other process that wakes takes its time from a rank, and the other
ranks wait for that one at the next collective; this names those processes and what each costs, which a profile
of the ranks themselves cannot show.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROC = Path("/proc")


def cpu_ticks() -> dict[tuple[int, int], tuple[int, str, str]]:
    """(pid, tid) -> (user + system clock ticks so far, thread name, the process's command line)."""
    ticks = {}
    for process in PROC.iterdir():
        if not process.name.isdigit():
            continue
        try:
            command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            for thread in (process / "task").iterdir():
                stat = (thread / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                ticks[int(process.name), int(thread.name)] = (int(fields[11]) + int(fields[12]), name, command)
        except OSError:  # a process or thread that ended meanwhile
            continue
    return ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("delay_s", type=float, help="seconds to wait before the window (start-up left out)")
    parser.add_argument("window_s", type=float, help="seconds to sample")
    parser.add_argument("--top", type=int, default=20, help="processes and threads listed")
    args = parser.parse_args()
    time.sleep(args.delay_s)
    before, started = cpu_ticks(), time.monotonic()
    time.sleep(args.window_s)
    after, elapsed = cpu_ticks(), time.monotonic() - started
    per_second = os.sysconf("SC_CLK_TCK") * elapsed
    threads = [
        ((ticks - before.get(key, (0,))[0]) / per_second, key, name, command)
        for key, (ticks, name, command) in after.items()
    ]
    processes: dict[int, list] = {}
    for share, (pid, _), _, command in threads:
        processes.setdefault(pid, [0.0, command])[0] += share
    print(f"share of one core over {elapsed:.1f} s ({os.cpu_count()} cores; total {sum(t[0] for t in threads):.2f})")
    for pid, (share, command) in sorted(processes.items(), key=lambda item: -item[1][0])[: args.top]:
        print(f"{share:6.3f} {pid:8d}  {command[:100]}")
    print("threads:")
    for share, (pid, tid), name, _ in sorted(threads, reverse=True)[: args.top]:
        print(f"{share:6.3f} {pid:8d} {tid:8d}  {name}")


if __name__ == "__main__":
    main()

"""Fault campaign: one job trained through a seeded series of faults, then compared with the same job undisturbed.

    python bench/faults.py                              # every fault, seed 0
    python bench/faults.py --seed 7 --faults driver,corrupt --steps 120

The job is jobs/tiny.yaml on a local Ray (2 CPU workers, ZeRO-2), tracked by an `mlflow server` that this script
starts on 127.0.0.1 and stops by its pid. It checkpoints every 10 steps and recomputes its partition every 10,
adopted 2 steps after each request (so a restarted run adopts the same versions at the same steps); each version
takes at least 2 s, so a partitioner killed just after a request dies with it in flight (and training is paced at
0.2 s a step or more, so that an outage spans steps on any machine). An adversary reads rank 0's metric spool
and, at steps drawn from the seed, does each fault once the previous one has recovered:

- worker: kill -9 one Ray Train worker (Ray Train restarts the group from its last checkpoint)
- partitioner: kill -9 the partitioner actor just after a request (Ray restarts it and retries the request)
- mlflow: kill the MLflow server for --outage-s and start it again on the same port and store
- spool: in that outage's last seconds, fill the metric spool to its size bound (one sparse line as long as the
  bound, as a long outage's backlog would), so what is logged until the server is back is dropped and counted
- driver: kill -9 the `xcm run` session (driver, its local Ray, workers, actors), then `xcm resume` the run
- corrupt: before that resume, truncate a ZeRO shard of the newest checkpoint (the resume takes the one before)

Then, read back with MLflow's own client: every step's metrics logged once (what the full spool dropped excepted,
which its `spool/dropped_metrics` must count), the loss curve and final weights equal to the undisturbed
run's, both runs FINISHED, no process of either run's Ray left, no `step-*` directory in the run directory
that Ray Train's list does not name or that does not verify, and no checkpoint set aside by the resume left (the
truncated one is quarantined until the run has an intact checkpoint as new, then deleted). A duplicated step is
charged to the fault injected last before its second logging, a lost one to the fault injected last at or before
its step. Recovery: seconds
from the fault (for the outage and the full spool, from the server's return) until the run is whole again: a step
past the fault logged, the version adopted, the backlog in MLflow, the spool writing. Prints one row per fault;
exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import inspect
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: tests.helpers (the MLflow server, a session's processes)

from tests.helpers import MlflowServer, free_port, kill_session, session_processes  # noqa: E402

FAULTS = ("worker", "partitioner", "mlflow", "spool", "driver", "corrupt")
CHECKPOINT_EVERY = 10
PARTITION_EVERY = 10
END_MARGIN = 40  # no fault this close to the end, and the server is back 20 steps before it
FILL_LEAD_S = 6.0  # the spool is filled this long before the server returns
WAIT_S = 600.0  # for any one thing the adversary waits for
WEIGHT_TOLERANCE = 1e-6
LOSS_TOLERANCE = 1e-6
COMPARED_VALUES = ("loss", "task_loss", "clusterability", "lr", "partition/version")
NOT_COMPARED = ("system/", "checkpoint/resumed_from_step", "spool/dropped_metrics", "resources/")


class CampaignError(RuntimeError):
    """The campaign could not go on (a run died, or what it waited for never came)."""


def job_settings(name: str, steps: int, tracking_uri: str) -> list[str]:
    return [
        f"name={name}",
        f"training.steps={steps}",
        f"training.report_every={max(1, steps // 4)}",
        "evaluation.every_steps=0",
        f"checkpointing.every_steps={CHECKPOINT_EVERY}",
        "checkpointing.keep_last=2",
        "checkpointing.max_failures=3",
        f"modularity.partition_every={PARTITION_EVERY}",
        "partitioner.adopt_after_steps=2",
        "partitioner.delay_s=2",  # paces training: at least 0.2 s a step on any machine
        "partitioner.heatmap_every=1000000",
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=xcm-faults",
        "tracking.log_model=false",
        "tracking.system_metrics_every_s=0",
    ]


def ray_processes(gcs_port: int) -> dict[int, str]:
    """The live processes of the Ray whose GCS is on ``gcs_port`` (each inherits the variable that chose it,
    wherever its session is), with their titles (``ray::RayTrainWorker``, ``ray::Partitioner``...)."""
    marker = f"RAY_GCS_SERVER_PORT={gcs_port}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
    return found


class Driver:
    """One `xcm run` or `xcm resume`, in a session of its own, with its local Ray on a GCS port chosen here."""

    def __init__(self, arguments: list[str], workdir: Path, log: Path):
        self.gcs_port = free_port()
        self.log = log
        environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        environment |= {"PYTHONPATH": str(ROOT), "RAY_GCS_SERVER_PORT": str(self.gcs_port)}
        environment.setdefault("HF_HUB_OFFLINE", "1")
        with log.open("a") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *arguments],
                cwd=workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=environment,
            )

    def titled(self, prefix: str) -> list[int]:
        return sorted(pid for pid, title in ray_processes(self.gcs_port).items() if title.startswith(prefix))

    def kill(self) -> None:
        kill_session(self.process.pid)
        self.process.wait()

    def leftovers(self, grace_s: float = 30.0) -> list[int]:
        """Processes of this run still alive ``grace_s`` after it ended; killed (they are this campaign's)."""
        deadline = time.monotonic() + grace_s
        while (left := set(session_processes(self.process.pid)) | set(ray_processes(self.gcs_port))) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return sorted(left)

    def run_id(self) -> str | None:
        found = re.search(r"MLflow run ([0-9a-f]{32})", self.log.read_text(errors="replace"))
        return found and found.group(1)


class SpoolWatch:
    """Rank 0's metric spool read as it grows. A line longer than any record (the filled bound) is skipped
    without being held; when the writer compacts the file, it is read again from its start."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self.latest_step = -1
        self._inode, self._offset = None, 0

    def poll(self) -> None:
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return
        with stream:
            status = os.fstat(stream.fileno())
            if status.st_ino != self._inode or status.st_size < self._offset:
                self._inode, self._offset = status.st_ino, 0
            stream.seek(self._offset)
            while line := stream.readline(1 << 20):
                if not line.endswith(b"\n"):
                    if len(line) < 1 << 20 or not self._skip_line(stream):
                        return  # still being written
                    self._offset = stream.tell()
                    continue
                self._offset += len(line)
                record = json.loads(line) if line.startswith(b'{"step"') else None
                if record:
                    self.records.append(record)
                    self.latest_step = max(self.latest_step, record["step"])

    @staticmethod
    def _skip_line(stream) -> bool:
        while chunk := stream.read(1 << 20):
            if (newline := chunk.find(b"\n")) >= 0:
                stream.seek(newline + 1 - len(chunk), os.SEEK_CUR)
                return True
        return False

    def first_after(self, since: float, matches) -> dict | None:
        """The first record written after ``since`` (time.time()) that ``matches``."""
        return next((r for r in self.records if r["timestamp"] > since * 1000 and matches(r)), None)


def fill_spool(path: Path) -> None:
    """Append one sparse line as long as the spool's bound of unsent bytes, under the spool's own lock, so that
    every later append finds the bound reached until the sender gets past it (the server answers again)."""
    from orchestrator.metric_spool import MetricSpool

    bound = inspect.signature(MetricSpool).parameters["max_unsent_bytes"].default  # what rank 0's spool runs with
    with path.with_name(path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with path.open("r+b") as spool:
            end = os.fstat(spool.fileno()).st_size
            spool.seek(end + bound)
            spool.write(b"\n")


def truncate_newest_shard(run_directory: Path) -> tuple[int, int]:
    """Cut the largest ZeRO file of the newest intact checkpoint in half: (its step, the step of the intact one
    before it, which a resume must take)."""
    from orchestrator.train import checkpoint_store as store

    newest = store.newest_intact(*store.resolve(str(run_directory)))
    shard = max((Path(newest.path) / store.DEEPSPEED).rglob("*.pt"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)
    previous = store.newest_intact(*store.resolve(str(run_directory)))
    return newest.state.step, previous.state.step


@dataclass
class Injection:
    fault: str
    label: str
    step: int
    at: float  # time.time() of the injection
    recovery_s: float | None = None
    problems: list[str] = field(default_factory=list)
    lost: set[int] = field(default_factory=set)
    duplicated: set[int] = field(default_factory=set)


def plan(seed: int, faults: list[str], steps: int) -> list[tuple[str, int]]:
    """The events in order with their steps: each in its own slot of the run, the outage in the first half."""
    rng = random.Random(seed)
    events = [event for event in ("worker", "partitioner") if event in faults]
    events += ["outage"] if {"mlflow", "spool"} & set(faults) else []
    events += ["driver"] if {"driver", "corrupt"} & set(faults) else []
    rng.shuffle(events)
    if "outage" in events and events.index("outage") >= max(1, len(events) // 2):
        index = events.index("outage")
        other = rng.randrange(max(1, len(events) // 2))
        events[index], events[other] = events[other], events[index]
    first, last = 2 * CHECKPOINT_EVERY + 1, steps - END_MARGIN
    slot = (last - first) // max(1, len(events))
    if slot < 1:
        raise CampaignError(f"{steps} steps leave no room for {len(events)} faults: raise --steps")
    planned = []
    for index, event in enumerate(events):
        step = first + index * slot + rng.randrange(slot)
        if event == "partitioner":
            step = -(-step // PARTITION_EVERY) * PARTITION_EVERY  # a request step
        planned.append((event, step))
    return planned


class Adversary:
    """Injects the planned faults into one run, each once the previous one has recovered."""

    def __init__(self, workdir: Path, server: MlflowServer, steps: int, faults: list[str], outage_s: float, seed: int):
        self.workdir, self.server, self.steps, self.faults = workdir, server, steps, faults
        self.outage_s = outage_s
        self.rng = random.Random(seed + 1)
        self.drivers: list[Driver] = []
        self.injections: list[Injection] = []
        self.expected_resume: tuple[int, int] | None = None  # (corrupted step, the step resumed from)
        self.watch: SpoolWatch | None = None
        self.run_directory: Path | None = None

    @property
    def driver(self) -> Driver:
        return self.drivers[-1]

    def run(self, settings: list[str], planned: list[tuple[str, int]]) -> None:
        from orchestrator.train import checkpoint_store as store

        self.drivers.append(
            Driver(["run", str(ROOT / "jobs" / "tiny.yaml"), *_sets(settings)], self.workdir, self._log())
        )
        self.run_directory = self._wait(lambda: next(self.workdir.glob("xcm-runs/checkpoints/faults-*"), None), "run")
        self.watch = SpoolWatch(self.run_directory / store.METRIC_SPOOL)
        for event, step in planned:
            if self._wait(lambda step=step: self.watch.latest_step >= step or None, f"step {step}", ends=True) is None:
                self.injections.append(
                    Injection(
                        event,
                        f"{event} (not injected)",
                        step,
                        time.time(),
                        problems=["the run ended before its step: raise --steps"],
                    )
                )
                continue
            getattr(self, f"_{event}")()
        code = self.driver.process.wait(timeout=WAIT_S)
        if code != 0:
            raise CampaignError(f"the last launch exited {code}: see {self.driver.log}")

    def resumed_steps(self, since: float) -> list[int]:
        """The steps that launches after ``since`` logged as resumed from (a step logged before is not again)."""
        key = "checkpoint/resumed_from_step"
        return [
            int(r["metrics"][key]) for r in self.watch.records if r["timestamp"] > since * 1000 and key in r["metrics"]
        ]

    def _log(self) -> Path:
        return self.workdir / f"launch-{len(self.drivers)}.log"

    def _wait(self, condition, what: str, timeout_s: float = WAIT_S, ends: bool = False):
        """What ``condition`` returns once true; None when the run ended first and ``ends`` allows it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.watch is not None:
                self.watch.poll()
            if found := condition():
                return found
            if self.driver.process.poll() is not None:
                if ends and self.driver.process.returncode == 0:
                    return None
                raise CampaignError(
                    f"the run ended ({self.driver.process.returncode}) before {what}: {self.driver.log}"
                )
            if time.monotonic() > deadline:
                raise CampaignError(f"waited {timeout_s:.0f} s for {what}")
            time.sleep(0.1)

    def _start(self, fault: str, label: str) -> Injection:
        injection = Injection(fault, label, self.watch.latest_step, time.time())
        self.injections.append(injection)
        return injection

    def _step_past(self, injection: Injection, since: float | None = None) -> float | None:
        """Seconds until a step past the fault was logged (after ``since``: by a new launch)."""
        record = self._wait(
            lambda: self.watch.first_after(since or injection.at, lambda r: r["step"] > injection.step),
            "a step past the fault",
            ends=True,
        )
        return None if record is None else record["timestamp"] / 1000 - injection.at

    def _worker(self) -> None:
        victims = self._wait(lambda: self.driver.titled("ray::RayTrainWorker"), "the training workers")
        victim = self.rng.choice(victims)
        injection = self._start("worker", f"kill -9 a Ray Train worker (1 of {len(victims)})")
        os.kill(victim, signal.SIGKILL)
        injection.recovery_s = self._step_past(injection)

    def _partitioner(self) -> None:
        victim = self._wait(lambda: self.driver.titled("ray::Partitioner"), "the partitioner actor")[0]
        injection = self._start("partitioner", "kill -9 the partitioner actor")
        os.kill(victim, signal.SIGKILL)
        record = self._wait(
            lambda: self.watch.first_after(
                injection.at, lambda r: r["step"] > injection.step and "partition/version" in r["metrics"]
            ),
            "a partition version adopted after the kill",
            ends=True,
        )
        injection.recovery_s = None if record is None else record["timestamp"] / 1000 - injection.at

    def _outage(self) -> None:
        outage = self._start("mlflow", "MLflow server down")
        self.server.stop()
        fill = None
        fill_wanted = "spool" in self.faults
        while (
            elapsed := time.time() - outage.at
        ) < self.outage_s and self.watch.latest_step < self.steps - END_MARGIN // 2:
            if fill_wanted and fill is None and elapsed >= self.outage_s - FILL_LEAD_S:
                fill = self._start("spool", "metric spool filled to its bound")
                fill_spool(self.watch.path)
            self._wait(lambda: True, "the outage")  # reads the spool, and fails if the run died
            time.sleep(0.2)
        if fill_wanted and fill is None:
            fill = self._start("spool", "metric spool filled to its bound")
            fill_spool(self.watch.path)
            time.sleep(2)
        self.server.start()
        back = time.time()
        outage.label += f" {back - outage.at:.0f} s"
        if "mlflow" not in self.faults:
            self.injections.remove(outage)
        last_spooled = max(
            r["step"] for r in self.watch.records if "loss" in r["metrics"] and r["timestamp"] < back * 1000
        )
        client = _client(self.server.uri)
        run_id = self.driver.run_id()
        self._wait(
            lambda: max((m.step for m in client.get_metric_history(run_id, "loss")), default=-1) >= last_spooled,
            "MLflow to hold the steps spooled in the outage",
        )
        outage.recovery_s = time.time() - back
        if fill is not None:
            record = self._wait(
                lambda: self.watch.first_after(back, lambda r: "spool/dropped_metrics" in r["metrics"]),
                "the spool to write again",
                ends=True,
            )
            if record is None:  # the run ended first: its logger sent the count itself
                fill.problems.append("the run ended before the spool wrote again: raise --steps")
            else:
                fill.recovery_s = record["timestamp"] / 1000 - back

    def _driver(self) -> None:
        killed = self._start("driver", "kill -9 the driver's session, xcm resume")
        self.driver.kill()
        if "corrupt" in self.faults:
            corrupted, previous = truncate_newest_shard(self.run_directory)
            self.expected_resume = (corrupted, previous)
            corrupt = Injection(
                "corrupt", f"truncated shard of step-{corrupted} before the resume", killed.step, killed.at
            )
            self.injections.append(corrupt)
        if "driver" not in self.faults:
            self.injections.remove(killed)
        resumed_at = time.time()
        self.drivers.append(Driver(["resume", str(self.run_directory)], self.workdir, self._log()))
        recovery = self._step_past(killed, since=resumed_at)
        killed.recovery_s = recovery
        if "corrupt" in self.faults:
            corrupt.recovery_s = recovery


def _sets(settings: list[str]) -> list[str]:
    return [argument for setting in settings for argument in ("--set", setting)]


def _client(uri: str):
    from orchestrator import tracking

    return tracking.client(uri)


# ---- the comparison ----------------------------------------------------------------------------------------------


def histories(client, run_id: str) -> dict[str, list]:
    keys = client.get_run(run_id).data.metrics.keys()
    return {key: client.get_metric_history(run_id, key) for key in keys if not key.startswith(NOT_COMPARED)}


def charge(injections: list[Injection], logged_at_ms: float) -> Injection | None:
    """The fault injected last before ``logged_at_ms``."""
    before = [i for i in injections if i.at * 1000 <= logged_at_ms]
    return max(before, key=lambda i: i.at) if before else None


def compare_metrics(client, reference_id: str, run_id: str, injections: list[Injection]) -> dict:
    """Steps lost and duplicated, charged to faults (or to none), and the largest difference of compared values."""
    reference, disturbed = histories(client, reference_id), histories(client, run_id)
    uncharged: dict[str, set[int]] = {"lost": set(), "duplicated": set()}
    missing_metrics = {i.fault: 0 for i in injections}
    largest = 0.0
    for key, expected in reference.items():
        got = sorted(disturbed.get(key, []), key=lambda m: (m.step, m.timestamp))
        steps = [m.step for m in got]
        for index, metric in enumerate(got):
            if index and steps[index - 1] == metric.step:
                _charge(injections, metric.timestamp, "duplicated", metric.step, uncharged)
        for step in sorted({m.step for m in expected} - set(steps)):
            injection = max((i for i in injections if i.step <= step), key=lambda i: (i.step, i.at), default=None)
            (injection.lost if injection else uncharged["lost"]).add(step)
            if injection is not None:
                missing_metrics[injection.fault] += 1
        if key in COMPARED_VALUES:
            values = {m.step: m.value for m in got}
            largest = max([largest, *(abs(values[m.step] - m.value) for m in expected if m.step in values)])
    return {"uncharged": uncharged, "missing_metrics": missing_metrics, "largest_difference": largest}


def _charge(injections, logged_at_ms, kind: str, step: int, uncharged) -> Injection | None:
    injection = charge(injections, logged_at_ms)
    (getattr(injection, kind) if injection is not None else uncharged[kind]).add(step)
    return injection


def final_weight_difference(reference_directory: Path, run_directory: Path, steps: int) -> float:
    from orchestrator.train import checkpoint_store as store
    from orchestrator.train.export import consolidated_state_dict

    weights = []
    for directory in (reference_directory, run_directory):
        located = store.newest_intact(*store.resolve(str(directory)))
        if located.state.step != steps:
            raise CampaignError(f"{directory}'s newest checkpoint is step {located.state.step}, not {steps}")
        weights.append(consolidated_state_dict(Path(located.path), located.state))
    return max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0])


def stray_checkpoints(run_directory: Path) -> list[str]:
    """Checkpoint directories that Ray Train's list does not name (keep_last never deletes them), listed ones
    that are gone, any that does not verify, and any left set aside by a resume (superseded-*: this campaign rolls
    nothing back; refused-*: deleted once the run has an intact checkpoint as new)."""

    from orchestrator.train import checkpoint_store as store

    snapshot = json.loads((run_directory / store.RAY_SNAPSHOT).read_text())
    listed = {result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]}
    present = {
        p.name
        for p in run_directory.iterdir()
        if p.is_dir() and p.name.startswith((store.CHECKPOINT_PREFIX, store.UNIVERSAL_PREFIX))
    }
    problems = [f"{name}: not in Ray Train's list" for name in sorted(present - listed)]
    problems += [f"{name}: listed but missing" for name in sorted(listed - present)]
    for name in sorted(present):
        if reason := not_intact(run_directory / name):
            problems.append(f"{name}: {reason}")
    aside = (store.SUPERSEDED_PREFIX, store.REFUSED_PREFIX)
    problems += [f"{p.name}: set aside and left" for p in sorted(run_directory.iterdir()) if p.name.startswith(aside)]
    return problems


def not_intact(directory: Path) -> str | None:
    """Why a local checkpoint directory does not verify; None when it does."""
    import pyarrow.fs as pafs

    from orchestrator.train import checkpoint_store as store

    return store.problem(pafs.LocalFileSystem(), str(directory))


def resumed_from(log: Path) -> list[int]:
    return [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log.read_text(errors="replace"))]


# ---- the campaign ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    injections: list[Injection]
    invariants: dict[str, tuple[bool, str]]
    wall_s: float

    @property
    def ok(self) -> bool:
        return all(not i.problems for i in self.injections) and all(ok for ok, _ in self.invariants.values())

    def table(self) -> str:
        rows = [("fault", "step", "survived", "lost", "dup", "recovery")]
        for i in self.injections:
            recovery = "-" if i.recovery_s is None else f"{i.recovery_s:.1f} s"
            survived = "yes" if not i.problems else "NO: " + "; ".join(i.problems)
            rows.append((i.label, str(i.step), survived, str(len(i.lost)), str(len(i.duplicated)), recovery))
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)) + "  " + row[5]
            for row in rows
        ]
        lines += [f"{name}: {'ok' if ok else 'FAILED'} ({detail})" for name, (ok, detail) in self.invariants.items()]
        lines.append(f"campaign wall time: {self.wall_s:.0f} s")
        return "\n".join(lines)


def campaign(workdir: Path, seed: int, faults: list[str], steps: int, outage_s: float) -> Report:
    """Run the undisturbed job, then the same job through the faults, and compare them."""
    started = time.monotonic()
    server = MlflowServer(workdir / "mlflow")
    server.start()
    try:
        reference = Driver(
            ["run", str(ROOT / "jobs" / "tiny.yaml"), *_sets(job_settings("reference", steps, server.uri))],
            workdir,
            workdir / "reference.log",
        )
        if reference.process.wait(timeout=WAIT_S * 2) != 0:
            raise CampaignError(f"the undisturbed run failed: {reference.log}")
        adversary = Adversary(workdir, server, steps, faults, outage_s, seed)
        try:
            adversary.run(job_settings("faults", steps, server.uri), plan(seed, faults, steps))
        finally:
            for driver in adversary.drivers:
                if driver.process.poll() is None:
                    driver.kill()
        leftovers = [pid for driver in [reference, *adversary.drivers] for pid in driver.leftovers()]
        return judge(workdir, server, reference, adversary, steps, leftovers, time.monotonic() - started)
    finally:
        server.stop()


def judge(workdir, server, reference: Driver, adversary: Adversary, steps: int, leftovers, wall_s) -> Report:
    client = _client(server.uri)
    reference_id, run_id = reference.run_id(), adversary.drivers[0].run_id()
    compared = compare_metrics(client, reference_id, run_id, adversary.injections)
    dropped = max((m.value for m in client.get_metric_history(run_id, "spool/dropped_metrics")), default=0)
    for injection in adversary.injections:
        if injection.recovery_s is None:
            injection.problems.append("never recovered")
        if injection.duplicated:
            injection.problems.append(f"steps logged twice: {sorted(injection.duplicated)[:5]}")
        if injection.fault == "spool":
            # A dropped step that a later restart recomputed is logged after all: missing ones, never more than counted.
            if not 0 < compared["missing_metrics"]["spool"] <= dropped:
                injection.problems.append(
                    f"{compared['missing_metrics']['spool']} metrics missing, {dropped:.0f} counted"
                )
        elif injection.lost:
            injection.problems.append(f"steps lost: {sorted(injection.lost)[:5]}")
        if injection.fault == "corrupt":
            # Only the resume right after the corruption is judged: the resumed run saves the corrupted step again,
            # intact, and a later fault may rightly restore from that one.
            corrupted, previous = adversary.expected_resume
            resumed = adversary.resumed_steps(injection.at) or resumed_from(adversary.run_directory / "xcm.log")
            if resumed[:1] != [previous]:
                injection.problems.append(f"the resume started from {resumed[:1]}, not step {previous}")
            again = adversary.run_directory / f"step-{corrupted:08d}"
            if again.exists() and not_intact(again):
                injection.problems.append("the corrupt checkpoint is still in the run directory")
    reference_directory = next(workdir.glob("xcm-runs/checkpoints/reference-*"))
    weights = final_weight_difference(reference_directory, adversary.run_directory, steps)
    statuses = [client.get_run(i).info.status for i in (reference_id, run_id)]
    stray = stray_checkpoints(adversary.run_directory)
    uncharged = compared["uncharged"]
    invariants = {
        "runs FINISHED": (statuses == ["FINISHED"] * 2, f"undisturbed {statuses[0]}, disturbed {statuses[1]}"),
        "final weights": (
            weights <= WEIGHT_TOLERANCE,
            f"largest difference {weights:.2e} (tolerance {WEIGHT_TOLERANCE})",
        ),
        "loss curve": (
            compared["largest_difference"] <= LOSS_TOLERANCE,
            f"largest difference of {', '.join(COMPARED_VALUES)} {compared['largest_difference']:.2e}",
        ),
        "steps before any fault": (
            not any(uncharged.values()),
            f"lost {sorted(uncharged['lost'])[:5]}, duplicated {sorted(uncharged['duplicated'])[:5]}",
        ),
        "no orphaned Ray processes": (not leftovers, f"left: {leftovers}"),
        "checkpoints all listed and intact": (
            not stray,
            "; ".join(stray) or "every step-* listed and verified, nothing set aside left",
        ),
    }
    return Report(adversary.injections, invariants, wall_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds the MLflow server is down")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary one)")
    args = parser.parse_args()
    faults = [fault for fault in args.faults.split(",") if fault]
    if unknown := set(faults) - set(FAULTS):
        parser.error(f"unknown faults {sorted(unknown)}: pick from {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="xcm-faults-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        report = campaign(workdir, args.seed, faults, args.steps, args.outage_s)
        print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

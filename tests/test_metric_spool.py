"""The on-disk metric spool and the logger that sends it: nothing lost, nothing logged twice."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.metric_spool import MetricSpool, SpoolInUse
from orchestrator.tracking import MetricLogger


def test_unsent_metrics_survive_a_dead_process(tmp_path):
    """What one spool wrote but never sent is what a new spool on the same file sends (a restarted rank 0)."""
    first = MetricSpool(tmp_path / "spool.jsonl")
    first.append({"loss": 2.0}, step=0, timestamp_ms=1)
    first.append({"loss": 1.5}, step=1, timestamp_ms=2)
    records, offset = first.unsent(max_metrics=1)
    assert [record["step"] for record in records] == [0]
    first.mark_sent(offset)  # step 0 reached MLflow, then the process died (the kernel closes its files)
    first.close()
    second = MetricSpool(tmp_path / "spool.jsonl")
    records, offset = second.unsent(max_metrics=1000)
    assert records == [{"step": 1, "timestamp": 2, "metrics": {"loss": 1.5}}]
    second.mark_sent(offset)
    assert not second.pending()


def test_steps_already_logged_are_dropped(tmp_path):
    """A run recomputing steps after its checkpoint logs each metric's step only the first time."""
    spool = MetricSpool(tmp_path / "spool.jsonl")
    for step in range(5):
        spool.append({"loss": float(step)}, step, timestamp_ms=step)
    spool.close()
    resumed = MetricSpool(tmp_path / "spool.jsonl")
    for step in range(3, 7):  # resumed from the checkpoint at step 3
        resumed.append({"loss": 10.0 + step}, step, timestamp_ms=step)
    records, _ = resumed.unsent(max_metrics=1000)
    losses = [(record["step"], record["metrics"]["loss"]) for record in records if "loss" in record["metrics"]]
    assert losses == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0)]


def test_torn_last_line_is_cut(tmp_path):
    """A process killed in the middle of a write leaves the spool readable, without the partial record."""
    path = tmp_path / "spool.jsonl"
    spool = MetricSpool(path)
    spool.append({"loss": 1.0}, 0, timestamp_ms=0)
    spool.close()
    with path.open("ab") as stream:
        stream.write(b'{"step": 1, "timestamp": 1, "metr')
    records, _ = MetricSpool(path).unsent(max_metrics=1000)
    assert [record["step"] for record in records] == [0]


def test_spool_is_bounded(tmp_path):
    """Past its unsent-bytes bound the spool drops new metrics instead of growing."""
    spool = MetricSpool(tmp_path / "spool.jsonl", max_unsent_bytes=500)
    for step in range(100):
        spool.append({"loss": 1.0}, step, timestamp_ms=step)
    assert (tmp_path / "spool.jsonl").stat().st_size <= 500
    _records, offset = spool.unsent(max_metrics=1000)
    spool.mark_sent(offset)  # the server caught up: there is room again
    spool.append({"loss": 1.0}, 100, timestamp_ms=100)
    assert spool.unsent(max_metrics=1000)[0][0]["step"] == 100


def test_sent_spool_is_compacted_but_remembers_steps(tmp_path):
    """Once all is sent a large spool shrinks, at the writer's next append, to the new record and one line that
    still knows the last step of every metric; the sender (another object on the path) reads on from there."""
    path = tmp_path / "spool.jsonl"
    spool = MetricSpool(path, compact_bytes=1000)
    sender = MetricSpool(path, writer=False)
    for step in range(100):
        spool.append({"loss": 1.0, "lr": 0.1}, step, timestamp_ms=step)
    sender.mark_sent(sender.unsent(max_metrics=10_000)[1])
    assert len(path.read_text().splitlines()) == 100  # the sender never rewrites the file
    spool.append({"loss": 1.5}, 100, timestamp_ms=100)
    assert len(path.read_text().splitlines()) == 2
    assert [record["step"] for record in sender.unsent(max_metrics=1000)[0]] == [100]
    sender.mark_sent(sender.unsent(max_metrics=1000)[1])
    spool.close()
    reopened = MetricSpool(path)
    assert not reopened.pending()
    reopened.append({"loss": 2.0}, 99, timestamp_ms=0)
    assert not reopened.pending()


def test_logger_resends_after_a_crash_without_duplicates(tmp_path):
    """A batch sent but not marked sent (a crash in between) is sent again, and MLflow keeps it once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("spool")).info.run_id
    spool_path = tmp_path / "spool.jsonl"
    crashed = MetricSpool(spool_path)
    for step in range(3):
        crashed.append({"loss": 3.0 - step}, step, timestamp_ms=1000 + step)
    from mlflow.entities import Metric

    records, _ = crashed.unsent(max_metrics=1000)
    client.log_batch(
        run_id, metrics=[Metric(k, v, r["timestamp"], r["step"]) for r in records for k, v in r["metrics"].items()]
    )
    crashed.close()  # ...and the process died before mark_sent
    logger = MetricLogger(uri, run_id, spool_path, interval_s=0.1)
    logger.log({"loss": 0.5}, 3)
    deadline = time.monotonic() + 30
    while len(client.get_metric_history(run_id, "loss")) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.close()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]


def test_sender_process_delivers_every_step_once_while_the_writer_compacts(tmp_path):
    """The sender process and the writer share the spool (it compacts under them, every ~2 KB), and when the pipe
    from the trainer closes without a word, as when it dies, the sender still delivers what is left, each step
    exactly once."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("sender")).info.run_id
    spool_path = tmp_path / "spool.jsonl"
    writer = MetricSpool(spool_path, compact_bytes=2000)
    sender = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.metric_sender", uri, run_id, str(spool_path), "--interval", "0.05"],
        stdin=subprocess.PIPE,
    )
    compactions, steps, deadline = 0, 0, time.monotonic() + 90
    while (steps < 300 or compactions < 3) and time.monotonic() < deadline:  # the sender needs a few s to start
        size = spool_path.stat().st_size if spool_path.exists() else 0
        writer.append({"loss": float(steps), "lr": 0.1}, steps, timestamp_ms=1000 + steps)
        compactions += spool_path.stat().st_size < size
        steps += 1
        time.sleep(0.005)
    sender.stdin.close()  # no drain timeout written: the trainer "died"
    assert sender.wait(timeout=120) == 0
    assert compactions >= 3
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(step, float(step)) for step in range(steps)]
    assert not MetricSpool(spool_path, writer=False).pending()


FULL_DISK_RUN = r"""
import resource, signal, sys, time
from pathlib import Path
from orchestrator.tracking import MetricLogger

uri, run_id, spool_path, recover = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "recover"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
logger = MetricLogger(uri, run_id, spool_path, interval_s=0.1)  # its sender process keeps the unlimited size
for step in range(10):
    logger.log({"loss": float(step)}, step)
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
# The disk fills up half-way through the next record: the write tears, then fails.
resource.setrlimit(resource.RLIMIT_FSIZE, (spool_path.stat().st_size + 20, limit[1]))
for step in range(10, 20):
    logger.log({"loss": float(step), "lr": 0.1}, step)
if recover:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    for step in range(20, 30):
        logger.log({"loss": float(step)}, step)
resource.setrlimit(resource.RLIMIT_FSIZE, limit)
logger.close()
print("trained to the end")
"""


def run_with_a_full_disk(tmp_path, recover: bool) -> tuple[MlflowClient, str, Path]:
    """A rank 0 logger in its own process whose spool hits a real file-size limit (RLIMIT_FSIZE) at step 10."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("full")).info.run_id
    spool_path = tmp_path / "spool.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, uri, run_id, str(spool_path), "recover" if recover else "stay-full"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0 and "trained to the end" in done.stdout, done.stderr[-3000:]
    assert "cannot take metrics (OSError: [Errno 27] File too large)" in done.stderr
    return client, run_id, spool_path


def test_a_full_disk_drops_metrics_counts_them_and_training_goes_on(tmp_path):
    """Appends that the disk refuses are dropped and counted, the logger keeps going, later appends succeed, and
    the count reaches MLflow as spool/dropped_metrics; the torn write left no fragment."""
    client, run_id, spool_path = run_with_a_full_disk(tmp_path, recover=True)
    losses = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert losses == list(range(10)) + list(range(20, 30))
    dropped = client.get_metric_history(run_id, "spool/dropped_metrics")
    assert [(m.step, m.value) for m in dropped] == [(20, 20.0)]  # steps 10-19: loss and lr
    assert all(json.loads(line) for line in spool_path.read_bytes().splitlines())


def test_a_disk_full_to_the_end_still_reports_the_dropped_count(tmp_path):
    """When the spool never writes again, closing the logger sends the dropped count to MLflow directly."""
    client, run_id, _ = run_with_a_full_disk(tmp_path, recover=False)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(10))
    dropped = client.get_metric_history(run_id, "spool/dropped_metrics")
    assert [(m.step, m.value) for m in dropped] == [(19, 20.0)]


CORRUPT_LINES = [
    b'{"step": 2, "timestamp": 2, "metr\n',  # torn, then written over by the next record
    b"\xff\xfe not utf-8\n",
    b"[" * 100_000 + b"\n",  # deeper than Python's recursion limit
    b'{"step": "3", "timestamp": 3, "metrics": {"loss": 3.0}}\n',  # wrong type
    b'{"step": 3, "timestamp": 3, "metrics": {"loss": "3.0"}}\n',
    b'{"step": 3, "timestamp": 3, "metrics": {"../../loss": 3.0}}\n',  # a name MLflow refuses, failing the batch
    b'{"last_steps": {"loss": 99}}\n',  # the memory line without its generation
]


def spool_with_corrupt_lines(path: Path) -> None:
    """Steps 0-5 of `loss`, with every kind of bad line between steps 1 and 4 and a bad line and a torn one last."""
    writer = MetricSpool(path)
    for step in (0, 1):
        writer.append({"loss": float(step)}, step, timestamp_ms=step)
    writer.close()
    with path.open("ab") as stream:
        stream.write(b"".join(CORRUPT_LINES))
    writer = MetricSpool(path)
    for step in (4, 5):
        writer.append({"loss": float(step)}, step, timestamp_ms=step)
    writer.close()
    with path.open("ab") as stream:
        stream.write(b'{"step": 6, "timestamp": 6, "metrics": 6}\n{"step": 7, "timest')


def test_corrupt_lines_are_skipped_and_counted_by_the_writer_and_the_reader(tmp_path):
    """Bad lines in the middle and at the end neither stop a writer from starting nor the reader from reading
    past them: each is skipped once, counted, and every whole record is read."""
    path = tmp_path / "spool.jsonl"
    spool_with_corrupt_lines(path)
    writer = MetricSpool(path)  # a restarted rank 0: reads its memory past the bad lines, cuts the torn tail
    assert writer.last_steps == {"loss": 5} and writer.skipped_lines == len(CORRUPT_LINES) + 1
    writer.append({"loss": 6.0}, 6, timestamp_ms=6)
    reader = MetricSpool(path, writer=False)
    records, marker = reader.unsent(max_metrics=1000)
    records_again, _ = reader.unsent(max_metrics=1000)  # a send failed: the same batch is read again
    assert records == records_again
    assert [record["step"] for record in records] == [0, 1, 4, 5, 6]
    assert reader.skipped_lines == len(CORRUPT_LINES) + 1
    reader.mark_sent(marker)
    assert not reader.pending()


def test_a_fragment_left_mid_run_costs_one_line_not_the_next_record(tmp_path):
    """A write whose fragment could not be cut stays a torn tail the reader waits at; the writer's next record
    starts on its own line, so only the fragment is skipped."""
    path = tmp_path / "spool.jsonl"
    writer = MetricSpool(path)
    reader = MetricSpool(path, writer=False)
    writer.append({"loss": 0.0}, 0, timestamp_ms=0)
    with path.open("ab") as stream:
        stream.write(b'{"step": 1, "timestamp": 1, "met')
    records, marker = reader.unsent(max_metrics=1000)
    assert [record["step"] for record in records] == [0]
    reader.mark_sent(marker)
    assert not reader.pending()  # the torn tail is not a record yet: no busy loop on it
    writer.append({"loss": 2.0}, 2, timestamp_ms=2)
    records, _ = reader.unsent(max_metrics=1000)
    assert [record["step"] for record in records] == [2] and reader.skipped_lines == 1


def test_the_sender_process_sends_every_whole_record_past_corrupt_lines(tmp_path):
    """The sender skips the bad lines and exits 0 with every valid step in MLflow, instead of crash-looping on
    the first bad line or retrying a batch MLflow refuses forever."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("corrupt")).info.run_id
    path = tmp_path / "spool.jsonl"
    spool_with_corrupt_lines(path)
    sender = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.metric_sender",
            uri,
            run_id,
            str(path),
            "--interval",
            "0.05",
            "--drain-timeout",
            "5",
        ],
        input=b"",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert sender.returncode == 0, sender.stderr.decode()[-3000:]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 4, 5]
    assert b"skipped 8 lines" in sender.stderr and b"unsent metrics" not in sender.stderr


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    """Two writers on one spool are impossible: the second gets SpoolInUse naming the holder, the first keeps
    writing, and the file holds each step once."""
    path = tmp_path / "spool.jsonl"
    first = MetricSpool(path)
    first.append({"loss": 0.0}, 0, timestamp_ms=0)
    with pytest.raises(SpoolInUse, match=rf"written by another process \(pid {os.getpid()} on "):
        MetricSpool(path, writer_wait_s=0.5)
    for step in range(1, 8):
        first.append({"loss": float(step)}, step, timestamp_ms=step)
    steps = [record["step"] for record in MetricSpool(path, writer=False).unsent(max_metrics=1000)[0]]
    assert steps == list(range(8))


def test_a_writer_takes_over_from_one_that_exits_during_its_wait(tmp_path):
    """A restarted rank 0 that starts while its predecessor is still exiting waits and then takes the spool."""
    path = tmp_path / "spool.jsonl"
    first = MetricSpool(path)
    threading.Timer(0.5, first.close).start()
    second = MetricSpool(path, writer_wait_s=30)
    second.append({"loss": 1.0}, 1, timestamp_ms=1)
    assert second.last_steps == {"loss": 1}


def test_the_lock_of_a_killed_writer_is_free_at_once(tmp_path):
    """A writer killed with SIGKILL (no cleanup) leaves no stale lock: the next writer starts without waiting."""
    import subprocess
    import sys

    path = tmp_path / "spool.jsonl"
    hold = (
        "import sys, time; from orchestrator.metric_spool import MetricSpool; "
        "spool = MetricSpool(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SpoolInUse):
            MetricSpool(path, writer_wait_s=0.2)
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    MetricSpool(path, writer_wait_s=0).close()
    assert time.monotonic() - started < 1


def send_until(spool: MetricSpool, client: MlflowClient, run_id: str, last_step: int) -> None:
    """What a sender process does, up to ``last_step``: each record to MLflow, then marked sent."""
    from mlflow.entities import Metric

    while True:
        records, marker = spool.unsent(max_metrics=1)
        if not records or records[0]["step"] > last_step:
            return
        client.log_batch(
            run_id, metrics=[Metric(k, v, r["timestamp"], r["step"]) for r in records for k, v in r["metrics"].items()]
        )
        spool.mark_sent(marker)


@pytest.mark.parametrize("sent_before_death", [3, 7])
def test_a_resume_on_another_node_sends_what_the_dead_node_spooled_once(tmp_path, sent_before_death):
    """Run A spools steps 0-8 on its node, keeps its unsent lines in the step-7 checkpoint (after step index 6)
    and dies having sent steps up to 3 (MLflow went down) or up to 7 (past the checkpoint); run B, a fresh process
    on another node with an empty spool, resumes there, recomputes steps 7-9: MLflow holds every step exactly once."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("moved")).info.run_id
    run_a = MetricSpool(tmp_path / "node-a" / "spool.jsonl")
    sender_a = MetricSpool(run_a.path, writer=False)
    checkpoint = tmp_path / "storage" / "unsent-metrics.jsonl"
    checkpoint.parent.mkdir()
    for step in range(9):
        run_a.append({"loss": 10.0 - step}, step, timestamp_ms=1000 + step)
        if step == 6:
            send_until(sender_a, client, run_id, min(sent_before_death, 3))
            assert sender_a.copy_unsent(checkpoint)
    send_until(sender_a, client, run_id, sent_before_death)  # ...and node A is lost with steps 8 (and more) unsent
    run_b = f"""
import sys
from pathlib import Path
from orchestrator.tracking import MetricLogger
logger = MetricLogger({uri!r}, {run_id!r}, Path({str(tmp_path / "node-b" / "spool.jsonl")!r}), interval_s=0.1)
logger.continue_run(Path({str(checkpoint)!r}))
for step in range(7, 10):
    logger.log({{"loss": 10.0 - step}}, step)
logger.close(timeout_s=300)  # a loaded machine starts the sender process slowly
"""
    finished = subprocess.run([sys.executable, "-c", run_b], capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(step, 10.0 - step) for step in range(10)]


def test_unsent_lines_kept_by_a_checkpoint_are_bounded_and_checked(tmp_path):
    """Importing a checkpoint's unsent lines reads no more than the spool's bound and skips lines that are not
    records (counted), as the spool does with its own file."""
    source = tmp_path / "unsent-metrics.jsonl"
    good = [json.dumps({"step": step, "timestamp": step, "metrics": {"loss": 1.0}}) for step in range(3)]
    source.write_text("\n".join([good[0], '{"step": -1, "timestamp": 0, "metrics": {}}', good[1], "x" * 500, good[2]]))
    spool = MetricSpool(tmp_path / "spool.jsonl", max_unsent_bytes=len(good[0]) * 2 + 60)
    assert spool.import_unsent(source) == 2  # the third record lies past the bound
    assert spool.skipped_lines == 1 and spool.last_steps == {"loss": 1}

"""The on-disk metric spool and the logger that sends it: nothing lost, nothing logged twice."""

import time

from mlflow import MlflowClient

from orchestrator.metric_spool import MetricSpool
from orchestrator.tracking import MetricLogger


def test_unsent_metrics_survive_a_dead_process(tmp_path):
    """What one spool wrote but never sent is what a new spool on the same file sends (a restarted rank 0)."""
    first = MetricSpool(tmp_path / "spool.jsonl")
    first.append({"loss": 2.0}, step=0, timestamp_ms=1)
    first.append({"loss": 1.5}, step=1, timestamp_ms=2)
    records, offset = first.unsent(max_metrics=1)
    assert [record["step"] for record in records] == [0]
    first.mark_sent(offset)  # step 0 reached MLflow, then the process died without closing
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
    records, offset = spool.unsent(max_metrics=1000)
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
    client.log_batch(run_id, metrics=[Metric(k, v, r["timestamp"], r["step"])
                                      for r in records for k, v in r["metrics"].items()])
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
    sender = subprocess.Popen([sys.executable, "-m", "orchestrator.metric_sender", uri, run_id, str(spool_path),
                               "--interval", "0.05"], stdin=subprocess.PIPE)
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

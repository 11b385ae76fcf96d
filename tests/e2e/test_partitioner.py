"""Partitioner actors in a whole job: a slow partitioner never stalls training, a killed one is restarted by
Ray and continues from the last version, and MLflow shows every version (metrics, Parquet, heatmaps, spec)."""

import io
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.spec import JobSpec
from orchestrator.train.launch import run_job
from tests.helpers import metric_history, tiny_spec

STEPS = 300  # enough for version 2 to come back from a restarted actor (~5-10 s) even at ~0.03 s a step
EVERY = 10  # steps between partition requests
DELAY_S = 1.0  # the slow partitioner: each version takes at least this long (tens of steps)
MATRICES = [
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
    "transformer.h.1.mlp.c_fc",
    "transformer.h.1.mlp.c_proj",
]


class PartitionerKiller(threading.Thread):
    """Kills the partitioner while version 2 is being computed, as a crash would (``ray.kill(no_restart=False)``),
    then calls it again: only a restarted actor answers. The step comes from the live progress board (MLflow
    lags by a second or more), so the kill lands just after version 2's request at step EVERY."""

    def __init__(self, timeout_s: float = 400):
        super().__init__(daemon=True)
        self._deadline = time.monotonic() + timeout_s
        self.killed_at_step: int | None = None
        self.partitioners: list[str] = []
        self.answered_after_kill = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._kill_during_version_2()
        except BaseException as error:  # surfaced by the test, which cannot see this thread's exceptions
            self.error = error

    def _kill_during_version_2(self) -> None:
        import ray

        def named(prefix: str):
            return next((ray.get_actor(name) for name in ray.util.list_named_actors() if name.startswith(prefix)), None)

        def step_past_request() -> int | None:
            # Rank 0 posts a step after training it; version 2's request went out before step EVERY trained.
            latest = ray.get(board.latest.remote())
            return latest["step"] if latest is not None and latest["step"] >= EVERY else None

        self._poll(lambda: ray.is_initialized() or None)  # a Ray call before run_job's init would start another Ray
        board, partitioner = self._poll(lambda: named("xcm-progress-")), self._poll(lambda: named("xcm-partitioner-"))
        self.partitioners = [name for name in ray.util.list_named_actors() if name.startswith("xcm-partitioner-")]
        self.killed_at_step = self._poll(step_past_request)
        ray.kill(partitioner, no_restart=False)
        share = ray.get(partitioner.partition.remote({}, None), timeout=max(1.0, self._deadline - time.monotonic()))
        self.answered_after_kill = share.partitions == {}

    def _poll(self, probe):
        while time.monotonic() < self._deadline:
            try:
                found = probe()
            except Exception:  # the actor does not exist yet
                found = None
            if found is not None:
                return found
            time.sleep(0.02)
        raise TimeoutError("the partitioner run never reached the state the killer waits for")


@pytest.fixture(scope="module")
def killed_slow_run(tmp_path_factory, local_ray):
    """The tiny job under real ZeRO-3 sharding, recomputing its partition every 10 steps with two partitioner
    actors (one per layer) that take >= 1 s a version; one is killed mid-version."""
    workdir = tmp_path_factory.mktemp("partitioner")
    spec = tiny_spec(
        f"training.steps={STEPS}",
        f"training.report_every={STEPS}",
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        f"modularity.partition_every={EVERY}",
        f"partitioner.delay_s={DELAY_S}",
        "partitioner.heatmap_every=2",
        "partitioner.actors=2",
        "evaluation.every_steps=0",
    )
    killer = PartitionerKiller()
    killer.start()
    result = run_job(spec, workdir)
    killer.join(timeout=60)
    return result, killer, MlflowClient(tracking_uri=result.tracking_uri)


@pytest.mark.slow
def test_slow_partitioner_is_adopted_late_while_training_goes_on(killed_slow_run):
    """Each recomputed version is adopted many steps after its request; every step trained meanwhile."""
    result, _, client = killed_slow_run
    versions = metric_history(client, result.run_id, metric_names.PARTITION_VERSION)
    lags = {m.step: m.value for m in metric_history(client, result.run_id, metric_names.PARTITION_LAG_STEPS)}
    assert [m.value for m in versions] == list(range(1, len(versions) + 1))
    assert versions[0].step == 0 and lags[0] == 0  # the first partition is awaited: nothing to train with before
    assert len(versions) >= 3
    for version in versions[1:]:
        assert lags[version.step] >= 1, (version, lags)  # trained on while the partitioner took its >= 1 s
    assert [m.step for m in metric_history(client, result.run_id, metric_names.CLUSTERABILITY)] == list(range(STEPS))
    assert min(m.value for m in metric_history(client, result.run_id, metric_names.PARTITION_SECONDS)) >= 0


@pytest.mark.slow
def test_killed_partitioner_is_restarted_and_continues_from_the_last_version(killed_slow_run):
    """Killed mid-version, the actor is restarted; version 2 arrives aligned to version 1, trained under 1 meanwhile."""
    result, killer, client = killed_slow_run
    assert killer.error is None, repr(killer.error)
    assert killer.answered_after_kill and len(killer.partitioners) == 2
    versions = metric_history(client, result.run_id, metric_names.PARTITION_VERSION)
    lags = {m.step: m.value for m in metric_history(client, result.run_id, metric_names.PARTITION_LAG_STEPS)}
    second = next(m for m in versions if m.value == 2)
    assert second.step - lags[second.step] <= killer.killed_at_step < second.step  # killed in flight, adopted later,
    agreement = {m.step: m.value for m in metric_history(client, result.run_id, metric_names.PARTITION_AGREEMENT)}
    assert agreement[second.step] > 0.5  # renamed to agree with version 1, not a fresh numbering
    for group in ("transformer.h.0.mlp", "transformer.h.1.mlp"):  # each layer from its own actor
        assert client.get_metric_history(result.run_id, metric_names.partition_agreement(group))
    kept = [
        m.value
        for m in metric_history(client, result.run_id, metric_names.CLUSTERABILITY)
        if killer.killed_at_step <= m.step < second.step
    ]
    assert len(kept) == second.step - killer.killed_at_step  # the loss ran under version 1 all the while,
    assert min(kept) > 0.5  # and kept the matrices modular under it
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_shows_every_version_and_the_resolved_spec(killed_slow_run):
    """C raw and normalised per matrix and step; per version sizes, Parquet, heatmaps (every 2nd, end); spec.yaml."""
    result, _, client = killed_slow_run
    run = client.get_run(result.run_id)
    for matrix in MATRICES:
        for key in (metric_names.layer_clusterability(matrix), metric_names.layer_clusterability_normalised(matrix)):
            assert len(client.get_metric_history(result.run_id, key)) == STEPS, key
    versions = metric_history(client, result.run_id, metric_names.PARTITION_VERSION)
    for group in ("transformer.h.0.mlp", "transformer.h.1.mlp"):
        sizes = [run.data.metrics[metric_names.partition_cluster_size(group, cluster)] for cluster in range(4)]
        assert sum(sizes) == 256  # every hidden neuron in one cluster

    local = Path(client.download_artifacts(result.run_id, ""))
    for version in versions:
        table = pq.read_table(local / "partitions" / f"partition-step{version.step}.parquet")
        assert set(table.column("version").to_pylist()) == {version.value}
        assert table.num_rows == 2 * (256 + 64 + 64)  # per group: hidden units, c_fc inputs, c_proj outputs
    drawn = {path.parent.name for path in (local / "heatmaps").glob("*/*.png")}
    assert {"version-1", "version-3", "final"} <= drawn and "version-2" not in drawn
    assert sorted(path.stem for path in (local / "heatmaps" / "final").glob("*.png")) == MATRICES
    png = (local / "heatmaps" / "final" / f"{MATRICES[0]}.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(png)).shape[0] > 100
    resolved = JobSpec.model_validate(yaml.safe_load((local / "spec.yaml").read_text()))
    assert resolved.partitioner.delay_s == DELAY_S and resolved.tracking.uri == result.tracking_uri


@pytest.mark.slow
def test_measure_reads_the_trained_checkpoint(killed_slow_run, tmp_path, capsys, monkeypatch):
    """`xcm measure <checkpoint>` consolidates the ZeRO-3 checkpoint and reports the trained model as modular."""
    from orchestrator.cli import main

    result, _, _ = killed_slow_run
    monkeypatch.chdir(tmp_path)
    assert main(["measure", result.checkpoint_path, "--k", "4", "--tracking-uri", result.tracking_uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("transformer.") for line in table) == len(MATRICES)
    mean = next(line for line in table if line.startswith("model mean"))
    joint, _, separate_mass, random = [float(value) for value in mean.split()[-4:]]
    assert joint > random + 0.3 and separate_mass > random + 0.3  # trained with lambda 20: clearly modular

"""Circuits computed on the training ranks (`circuits.attribution_on: ranks`) through a real run: Ray Train, two
DeepSpeed ZeRO-3 ranks with every parameter sharded, and MLflow, read back with MLflow's own client."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train.launch import run_job
from tests.helpers import tiny_spec

TASKS = ("add", "count")
TAUS = (0.9,)


@pytest.mark.slow
def test_tiny_gpt2_logs_attribution_circuits_computed_on_its_zero3_ranks(tmp_path, local_ray):
    """The tiny GPT-2 under ZeRO-3 with circuits every 16 of 32 steps on the ranks: MLflow has each task's circuit
    size (headline and per τ), locality under the training partition and the measurement's seconds at step
    indices 15 and 31, no specialization (the ranks compute attribution only), each step's per-matrix mask summary
    whose kept counts add up to the logged size, and the run FINISHED."""
    spec = tiny_spec(
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",  # every parameter sharded: no rank holds a whole matrix
        "training.steps=32",
        "training.report_every=16",
        "evaluation.every_steps=0",
        "circuits.every_steps=16",
        "circuits.attribution_on=ranks",
        "circuits.method=attribution",
        f"circuits.tasks=['synthetic:{','.join(TASKS)}']",
        "circuits.max_examples=16",
        "circuits.ig_steps=2",
        f"circuits.taus=[{','.join(map(str, TAUS))}]",
    )
    result = run_job(spec, tmp_path)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    keys = [
        "circuits/seconds",
        *(metric_names.circuit_size(task, tau) for task in TASKS for tau in (None, *TAUS)),
        *(metric_names.circuit_locality(task) for task in TASKS),
    ]
    for key in keys:
        history = client.get_metric_history(result.run_id, key)
        assert sorted(point.step for point in history) == [15, 31], key
    assert not [key for key in run.data.metrics if key.startswith("specialization/")]
    for step in (15, 31):
        folder = f"circuits/step-{step}"
        masks = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/circuits/attribution")}
        assert masks == {f"{task}.parquet" for task in TASKS}, masks
        for task in TASKS:
            rows = pq.read_table(
                client.download_artifacts(result.run_id, f"{folder}/circuits/attribution/{task}.parquet", str(tmp_path))
            ).to_pylist()
            assert {row["matrix"] for row in rows} == {
                f"transformer.h.{layer}.mlp.{name}.weight" for layer in (0, 1) for name in ("c_fc", "c_proj")
            }
            for tau in TAUS:
                chosen = [row for row in rows if row["tau"] == tau]
                assert all(row["size"] == 64 * 256 and 0 <= row["locality"] <= 1 for row in chosen), chosen
                size = next(
                    point.value
                    for point in client.get_metric_history(result.run_id, metric_names.circuit_size(task, tau))
                    if point.step == step
                )
                assert sum(row["kept"] for row in chosen) / sum(row["size"] for row in chosen) == pytest.approx(size)
        table = Path(client.download_artifacts(result.run_id, f"{folder}/circuits.txt", str(tmp_path)))
        assert table.read_text().startswith("partition: training (k=4)"), table.read_text()

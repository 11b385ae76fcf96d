"""The circuits side job through a real run: Ray Train + DeepSpeed + the circuits actor + MLflow."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("label_0_1_2_3_4", "label_5_6_7_8_9")


@pytest.mark.slow
def test_mnist_mlp_logs_circuits_at_every_steps_and_at_the_end(tmp_path, local_ray):
    """The MNIST MLP on digits with circuits every 3 of 6 steps: MLflow has each task's circuit size and the
    specialization index at step indices 2 and 5 (after 3 and 6 steps: the trained weights), and each step's
    damage heatmap, mask tables and table, computed under the training partition."""
    spec = load_spec(
        ROOT / "jobs" / "mnist_mlp.yaml",
        [
            "data.source=digits",
            "training.steps=6",
            "training.report_every=3",
            "evaluation.every_steps=0",
            "circuits.every_steps=3",
            "circuits.tasks=['labels:0+1+2+3+4,5+6+7+8+9']",
            "circuits.max_examples=60",
            "circuits.null_draws=4",
            "circuits.ig_steps=2",
            "circuits.taus=[0.9]",
        ],
    )
    result = run_job(spec, tmp_path)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    for key in (*map(metric_names.circuit_size, TASKS), metric_names.SPECIALIZATION_INDEX):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(point.step for point in history) == [2, 5], key
    sizes = [
        point.value
        for task in TASKS
        for point in client.get_metric_history(result.run_id, metric_names.circuit_size(task))
    ]
    assert all(0 < size <= 1 for size in sizes), sizes
    for step in (2, 5):
        folder = f"circuits/step-{step}"
        names = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/specialization")}
        assert {"damage.png", "damage.parquet"} <= names, names
        greedy = {Path(a.path).name for a in client.list_artifacts(result.run_id, f"{folder}/circuits/greedy")}
        assert greedy == {f"{task}.parquet" for task in TASKS}
        table = Path(client.download_artifacts(result.run_id, f"{folder}/circuits.txt", str(tmp_path)))
        assert table.read_text().startswith("partition: training (k=4)")

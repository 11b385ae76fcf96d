"""A classifier through the whole path: YAML -> Ray Train workers -> DeepSpeed ZeRO-3 in bf16 -> MLflow."""

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job
from orchestrator.train.schedule import lr_multiplier
from tests.helpers import metric_values

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


@pytest.mark.slow
def test_cnn_trains_on_digits_under_zero3_bf16_and_logs_throughput(tmp_path, local_ray):
    """The CIFAR CNN on the offline digits, ZeRO-3 + bf16 + accumulation + warm-up/cosine: it learns, C rises, and
    MLflow gets accuracy, samples/s, MFU and the scheduled lr at each step, every worker's peak memory and the
    held-out digits' eval loss and accuracy (above chance) every 8."""
    spec = load_spec(
        ROOT / "jobs" / "cifar_cnn.yaml",
        [
            "data.source=digits",
            f"training.steps={STEPS}",
            "training.report_every=8",
            "evaluation.every_steps=8",
            "training.lr=0.003",
            "training.micro_batch_size=32",
            "training.gradient_accumulation_steps=2",
            "training.precision=bf16",
            "training.warmup_steps=4",
            "training.lr_schedule=cosine",
            "modularity.partition_at_step=0",
            "deepspeed.zero_stage=3",
            "deepspeed.param_persistence_threshold=0",
        ],
    )
    result = run_job(spec, tmp_path)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    accuracy = metric_values(client, result.run_id, metric_names.ACCURACY)
    assert len(accuracy) == STEPS and sum(accuracy[-4:]) / 4 > sum(accuracy[:4]) / 4 + 0.2, accuracy
    clusterability = metric_values(client, result.run_id, metric_names.CLUSTERABILITY)
    assert clusterability[-1] > clusterability[0] + 0.2, clusterability
    lr = metric_values(client, result.run_id, metric_names.LEARNING_RATE)
    assert lr == pytest.approx([0.003 * lr_multiplier(step, spec.training) for step in range(STEPS)])
    for key in (metric_names.SAMPLES_PER_SECOND, metric_names.STEP_TIME):
        values = metric_values(client, result.run_id, key)
        assert len(values) == STEPS and min(values) > 0, key
    for key in (metric_names.PEAK_MEMORY_MAX, metric_names.worker_peak_memory(0), metric_names.worker_peak_memory(1)):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        # GiB, every 8 steps
        assert sorted(steps) == [7, 15] and min(metric_values(client, result.run_id, key)) > 0.1, key
    mfu = metric_values(client, result.run_id, metric_names.MFU)
    assert len(mfu) == STEPS and all(0 < value < 1 for value in mfu)
    for key in (metric_names.EVAL_LOSS, metric_names.EVAL_ACCURACY):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [7, 15], key
    eval_loss = metric_values(client, result.run_id, metric_names.EVAL_LOSS)
    eval_accuracy = metric_values(client, result.run_id, metric_names.EVAL_ACCURACY)
    assert eval_loss[-1] < math.log(10) and eval_accuracy[-1] > 0.3, (eval_loss, eval_accuracy)  # chance: 0.1
    assert client.get_metric_history(result.run_id, metric_names.EVAL_PERPLEXITY) == []  # text only

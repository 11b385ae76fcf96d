"""Throughput metrics: FLOPs counted per item, the MFU they imply, peak FLOP/s by hardware, peak memory."""

import subprocess
import sys

import pytest
import torch

from orchestrator import metric_names
from orchestrator.models.vision import MnistMLP
from orchestrator.spec import ResourcesSpec
from orchestrator.train.throughput import ThroughputMeter, flops_per_item, peak_flops


def test_mlp_flops_are_six_per_weight_per_sample():
    """A bias-free MLP costs 2 FLOPs per weight forward and 4 backward: 6 × parameters per sample."""
    model = MnistMLP()
    parameters = sum(p.numel() for p in model.parameters())
    assert flops_per_item(model, {"inputs": torch.zeros(4, 1, 28, 28)}, items=4) == 6 * parameters


def test_transformer_flops_count_attention():
    """A tiny GPT-2's counted FLOPs per token exceed 6 × its matmul weights by the attention term 12·L·T·d."""
    from orchestrator.models import build_model
    from orchestrator.spec import ModelSpec

    model = build_model(ModelSpec(), vocab_size=259, seed=0)
    tokens = 32
    counted = flops_per_item(model, {"input_ids": torch.zeros(1, tokens, dtype=torch.long)}, items=tokens)
    layers, width = 2, 64
    matmul_weights = layers * (4 * width * width + 2 * 4 * width * width) + width * 259  # attn, MLP, LM head
    assert counted == pytest.approx(6 * matmul_weights + 12 * layers * tokens * width)


def test_meter_reports_rate_step_time_and_mfu():
    """Items/s counts every worker; MFU is model FLOP/s over the workers' summed peak."""
    meter = ThroughputMeter(
        flops_per_item=1e6, peak_flops_per_worker=1e9, world_size=2, unit="samples", device=torch.device("cpu")
    )
    meter.record(seconds=0.5, items_per_rank=100)
    assert meter.window_metrics() == {
        metric_names.SAMPLES_PER_SECOND: 400.0,
        metric_names.STEP_TIME: 0.5,
        metric_names.MFU: pytest.approx(0.2),
    }


def test_meter_reports_means_over_the_window_until_restarted():
    """Steps recorded since the last restart are averaged together; a restart empties the window."""
    meter = ThroughputMeter(
        flops_per_item=1.0, peak_flops_per_worker=None, world_size=1, unit="tokens", device=torch.device("cpu")
    )
    meter.record(0.1, items_per_rank=60)
    assert meter.window_metrics()[metric_names.STEP_TIME] == pytest.approx(0.1)
    for seconds in (0.2, 0.3):
        meter.record(seconds, items_per_rank=60)
    assert meter.window_metrics() == {
        metric_names.TOKENS_PER_SECOND: pytest.approx(300.0),
        metric_names.STEP_TIME: pytest.approx(0.2),
    }
    meter.restart_window()
    assert meter.window_metrics() == {}
    meter.record(0.5, items_per_rank=60)
    assert meter.window_metrics()[metric_names.STEP_TIME] == 0.5


def test_peak_flops_from_spec_or_cpu_default():
    """The spec's peak wins; on CPU the default scales with the worker's cores."""
    cpu = torch.device("cpu")
    assert peak_flops(ResourcesSpec(peak_tflops=2.0), "fp32", cpu) == 2e12
    assert peak_flops(ResourcesSpec(cpus_per_worker=4), "fp32", cpu) == 4 * peak_flops(ResourcesSpec(), "fp32", cpu)


def test_peak_memory_is_the_process_rss_on_cpu():
    """On CPU the peak is the process's maximum resident set: with 1 GiB touched, it is at least the RSS now."""
    script = (
        "import torch; from orchestrator.train.throughput import peak_memory_bytes; "
        "block = torch.ones(2**30 // 4); "
        "rss = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') "
        "if line.startswith('VmRSS')); "
        "print(peak_memory_bytes(torch.device('cpu')), rss)"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    peak, rss = map(int, output.split())
    assert rss > 2**30 and peak > 0.99 * rss  # the kernel updates the peak lazily, by a few pages


def test_memory_is_gathered_every_report_and_at_the_end():
    """Peak memory is read at every report_every-th step and at the last, per worker and as the maximum."""
    meter = ThroughputMeter(
        1.0, None, world_size=1, unit="tokens", device=torch.device("cpu"), memory_every=5, steps=12
    )
    due = [step for step in range(12) if meter.memory_metrics(step)]
    assert due == [4, 9, 11] == [step for step in range(12) if meter.memory_due(step)]
    metrics = meter.memory_metrics(11)
    assert set(metrics) == {metric_names.worker_peak_memory(0), metric_names.PEAK_MEMORY_MAX}
    assert metrics[metric_names.PEAK_MEMORY_MAX] == metrics[metric_names.worker_peak_memory(0)] > 0

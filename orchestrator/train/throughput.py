"""Throughput, model FLOPs utilisation (MFU) and peak memory of the training workers, as MLflow metrics.

MFU = model FLOPs per item (token or sample) × items per second ÷ the workers' peak FLOP/s. Model FLOPs are
counted, not estimated: one forward of a single item under ``torch.utils.flop_counter`` (with the math
attention kernel, so attention's matmuls are counted too), times 3 for forward + backward. For a transformer
that is the familiar ``6·N + 12·L·T·d`` per token. Activation-checkpoint recomputation is not counted, as
is the convention for MFU. Peak FLOP/s: ``resources.peak_tflops`` when set, else the GPU's datasheet figure
by name, else a CPU default per core (a rough figure: read CPU MFU as a trend, not an absolute).
"""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

import torch

from orchestrator import metric_names
from orchestrator.train.due import due

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec, ResourcesSpec

# Dense tensor-core TFLOP/s per GPU at 16-bit precision and at fp32 (TF32 off), from the vendors' datasheets;
# matched against torch.cuda.get_device_name() in this order (the first listed name found wins).
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
)
CPU_PEAK_TFLOPS_PER_CORE = 0.1  # ~3 GHz × 32 fp32 FLOP/cycle (two AVX2 FMA units)


def flops_per_item(model: torch.nn.Module, probe: dict[str, torch.Tensor], items: int) -> float:
    """Training FLOPs (forward + backward) per item, counted on one forward of ``probe`` holding ``items`` items."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(**probe)
    return 3.0 * counter.get_total_flops() / items


def peak_flops(resources: ResourcesSpec, precision: str, device: torch.device) -> float | None:
    """Peak FLOP/s of one worker: the spec's figure, the GPU's by name (None for a GPU not in the table), or the
    CPU default per core."""
    if resources.peak_tflops:
        return resources.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for marker, half, single in GPU_PEAK_TFLOPS:
            if marker in name:
                return (single if precision == "fp32" else half) * 1e12
        return None  # unknown GPU: no MFU rather than a wrong one (resources.peak_tflops supplies it)
    return CPU_PEAK_TFLOPS_PER_CORE * resources.cpus_per_worker * 1e12


def throughput_meter(
    spec: JobSpec, flops_per_item: float, world_size: int, unit: str, device: torch.device
) -> ThroughputMeter:
    """The meter for a job's workers, with the peak FLOP/s of its hardware at its precision; memory is gathered
    every ``report_every`` steps and at the last."""
    return ThroughputMeter(
        flops_per_item,
        peak_flops(spec.resources, spec.training.precision, device),
        world_size,
        unit,
        device,
        memory_every=spec.training.report_every,
        steps=spec.training.steps,
    )


class ThroughputMeter:
    """Turns the training steps' wall time and item counts into items/s, step time and MFU for the whole job, and
    gathers every worker's peak memory now and then (a collective: on a loaded CPU one per step cost ~10% of a
    tiny step).

    Rates are means over a window of steps (since the trainer last logged them, ``restart_window``), not a
    single step's: the trainer reads its metrics back from the device only at the steps it logs or shows, so on
    a GPU a step that is neither ends without a synchronisation and its own wall time would only be the time to
    queue its kernels.
    """

    def __init__(
        self,
        flops_per_item: float,
        peak_flops_per_worker: float | None,
        world_size: int,
        unit: str,
        device: torch.device,
        memory_every: int = 1,
        steps: int = 0,
    ):
        self.flops_per_item = flops_per_item
        self.peak_flops = peak_flops_per_worker * world_size if peak_flops_per_worker else None
        self.world_size, self.device = world_size, device
        self.rate_name = metric_names.TOKENS_PER_SECOND if unit == "tokens" else metric_names.SAMPLES_PER_SECOND
        self.memory_every, self.steps = memory_every, steps
        self._seconds, self._items, self._steps = 0.0, 0, 0

    def record(self, seconds: float, items_per_rank: int) -> None:
        """Add one training step (its wall time and this rank's items) to the window."""
        self._seconds += seconds
        self._items += items_per_rank
        self._steps += 1

    def window_metrics(self) -> dict[str, float]:
        """Items/s over all workers (each rank counts the same), mean step time and the MFU they imply, over the
        window's steps; empty when it has none."""
        if not self._steps:
            return {}
        rate = self._items * self.world_size / self._seconds
        metrics = {self.rate_name: rate, metric_names.STEP_TIME: self._seconds / self._steps}
        if self.peak_flops:
            metrics[metric_names.MFU] = rate * self.flops_per_item / self.peak_flops
        return metrics

    def restart_window(self) -> None:
        """Start a new window (after its metrics were logged)."""
        self._seconds, self._items, self._steps = 0.0, 0, 0

    def memory_due(self, step: int) -> bool:
        """Whether every worker's peak memory is gathered after ``step``: every ``memory_every`` steps and at the
        last."""
        return due(step, self.memory_every, self.steps - 1)

    def memory_metrics(self, step: int) -> dict[str, float]:
        """Every worker's peak memory after ``step``, when due (every rank calls this at every step)."""
        return memory_metrics(self.device) if self.memory_due(step) else {}


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: CUDA memory allocated on a GPU, resident set size (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Every worker's peak memory in GiB (a collective: every rank calls it at the same step) and the maximum."""
    import torch.distributed as dist

    mine = torch.tensor([peak_memory_bytes(device) / 2**30], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    else:
        every = [mine]
    values = [float(value) for value in every]
    metrics = {metric_names.worker_peak_memory(rank): value for rank, value in enumerate(values)}
    metrics[metric_names.PEAK_MEMORY_MAX] = max(values)
    return metrics

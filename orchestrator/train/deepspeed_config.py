"""The DeepSpeed config for a job, derived from the spec (never written by hand in job files)."""

from __future__ import annotations

from orchestrator.spec import JobSpec

# Dynamic fp16 loss scaling (loss_scale 0): start at 2^training.initial_loss_scale_power, skip a step whose
# gradients overflow and halve the scale (the first overflow only uses up the `hysteresis`), double it after
# `loss_scale_window` clean steps. The clusterability term is part of the scaled loss, so it needs nothing extra.
_FP16_LOSS_SCALING = {"loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def deepspeed_config(spec: JobSpec, world_size: int, load_universal: bool = False) -> dict:
    """ZeRO stage and offload, batch geometry, precision and clipping as DeepSpeed expects them; with
    ``load_universal``, the engine's ``load_checkpoint`` reads DeepSpeed's universal form (a checkpoint written at
    another worker count, ``orchestrator.train.universal``).

    The optimizer is the trainer's client ``torch.optim.AdamW`` (``engine.client_optimizer``), except where
    DeepSpeed insists on its own (``deepspeed_builds_optimizer``): then the config's optimizer section names it.
    """
    training = spec.training
    config = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": zero_section(spec),
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {
            "enabled": training.precision == "fp16",
            **_FP16_LOSS_SCALING,
            "initial_scale_power": training.initial_loss_scale_power,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if deepspeed_builds_optimizer(spec):
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": training.lr, "weight_decay": training.weight_decay, "betas": list(training.betas)},
        }
    elif spec.deepspeed.offload_optimizer:
        # DeepSpeed insists on its CPUAdam under offload; on a CPU-only machine the client AdamW already runs
        # where the offloaded states live, so the check only costs a compile.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def deepspeed_builds_optimizer(spec: JobSpec) -> bool:
    """Whether DeepSpeed builds the optimizer from the config rather than taking the trainer's torch AdamW.

    Only GPU jobs that offload the optimizer: there DeepSpeed requires its CPUAdam (vectorised for the host,
    compiled on first use). Everywhere else torch's AdamW is as fast (``fused`` on GPU) and needs no compile;
    DeepSpeed's FusedAdam would cost an nvcc build on every fresh node and a CUDA toolkit that matches torch's.
    """
    return spec.resources.use_gpu and spec.deepspeed.offload_optimizer


def zero_section(spec: JobSpec) -> dict:
    """The ``zero_optimization`` section: the stage, optimizer offload, and ZeRO-3's persistence threshold."""
    zero = spec.deepspeed
    section: dict = {"stage": zero.zero_stage}
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.resources.use_gpu}
    if zero.param_persistence_threshold is not None:
        section["stage3_param_persistence_threshold"] = zero.param_persistence_threshold
    return section

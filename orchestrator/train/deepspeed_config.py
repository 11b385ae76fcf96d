"""The DeepSpeed config for a job, derived from the spec (never written by hand in job files)."""

from __future__ import annotations

from orchestrator.spec import JobSpec


def deepspeed_config(spec: JobSpec, world_size: int) -> dict:
    """ZeRO stage, batch geometry, precision and clipping as DeepSpeed expects them.

    On GPU the optimizer is DeepSpeed's own (its fused CUDA AdamW); on CPU the trainer passes a client
    ``torch.optim.AdamW`` instead, which spares the ~65 s compile of DeepSpeed's FusedAdam op.
    """
    training = spec.training
    config = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": spec.deepspeed.zero_stage},
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.resources.use_gpu:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": training.lr, "weight_decay": training.weight_decay}}
    return config

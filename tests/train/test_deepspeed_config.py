"""The DeepSpeed config derived from the spec: ZeRO stage and offload, batch geometry, precision, optimizer."""

from orchestrator.train.deepspeed_config import deepspeed_config
from tests.helpers import tiny_spec


def config_for(*overrides: str, world_size: int = 2) -> dict:
    return deepspeed_config(tiny_spec(*overrides), world_size)


def test_batch_geometry_multiplies_micro_batch_accumulation_and_workers():
    """The global batch DeepSpeed checks is micro-batch × accumulation steps × workers."""
    config = config_for("training.micro_batch_size=4", "training.gradient_accumulation_steps=3", world_size=2)
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
    ) == (4, 3, 24)


def test_zero3_options_reach_the_zero_section():
    """ZeRO-3's stage, optimizer offload and persistence threshold land in zero_optimization."""
    config = config_for(
        "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.param_persistence_threshold=0"
    )
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "stage3_param_persistence_threshold": 0,
    }
    assert config["zero_force_ds_cpu_optimizer"] is False  # the client AdamW is allowed under offload on CPU


def test_precision_sections_follow_the_spec():
    """bf16 turns on DeepSpeed's bf16 section; fp16 turns on fp16 with dynamic loss scaling from the spec's 2^power."""
    bf16 = config_for("training.precision=bf16")
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    fp16 = config_for("training.precision=fp16", "resources.gpus_per_worker=1")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]
    assert fp16["fp16"]["initial_scale_power"] == 16  # DeepSpeed's own default
    lower = config_for("training.precision=fp16", "resources.gpus_per_worker=1", "training.initial_loss_scale_power=8")
    assert lower["fp16"]["initial_scale_power"] == 8


def test_the_trainer_brings_torchs_adamw_unless_deepspeed_insists_on_its_own():
    """The client optimizer is torch's AdamW with the spec's lr, weight decay and betas, fused on GPU, so no job
    compiles DeepSpeed's FusedAdam; only a GPU job that offloads the optimizer gets DeepSpeed's CPUAdam, named in
    the config with the same hyperparameters."""
    import torch

    from orchestrator.train.engine import client_optimizer

    hyperparameters = ("training.lr=0.0003", "training.weight_decay=0.1", "training.betas=[0.9, 0.95]")
    model = torch.nn.Linear(4, 4)
    for overrides, fused in (((), False), (("resources.gpus_per_worker=1",), True)):
        spec = tiny_spec(*hyperparameters, *overrides)
        optimizer = client_optimizer(model, spec)
        assert isinstance(optimizer, torch.optim.AdamW)
        group = optimizer.param_groups[0]
        assert (group["lr"], group["weight_decay"], group["betas"], bool(group["fused"])) == (
            0.0003,
            0.1,
            (0.9, 0.95),
            fused,
        )
        assert "optimizer" not in deepspeed_config(spec, 2)
    offloaded = tiny_spec(*hyperparameters, "resources.gpus_per_worker=1", "deepspeed.offload_optimizer=true")
    assert client_optimizer(model, offloaded) is None
    config = deepspeed_config(offloaded, 2)
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 0.0003, "weight_decay": 0.1, "betas": [0.9, 0.95]}}
    assert "zero_force_ds_cpu_optimizer" not in config


def test_gradient_clipping_follows_the_spec():
    assert config_for("training.grad_clip=0.5")["gradient_clipping"] == 0.5

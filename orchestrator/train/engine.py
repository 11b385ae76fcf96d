"""The DeepSpeed engine of one rank: the model prepared for training, its optimizer and LR schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.spec import JobSpec

if TYPE_CHECKING:
    import torch


def build_engine(model: torch.nn.Module, spec: JobSpec, world_size: int, load_universal: bool = False):
    """``deepspeed.initialize`` at the spec's ZeRO stage and precision, with AdamW and the warm-up schedule;
    ``load_universal``: the engine will load a universal checkpoint (one written at another worker count)."""
    import deepspeed

    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.schedule import scheduler_factory

    training = spec.training
    if training.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()  # from_pretrained leaves eval mode, in which transformers skips activation checkpointing
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=client_optimizer(model, spec),
        config=deepspeed_config(spec, world_size, load_universal),
        lr_scheduler=scheduler_factory(training),
    )
    if training.compile:
        compile_engine(engine)
    return engine


def compile_engine(engine) -> None:
    """Compile the engine's module in place (``nn.Module.compile``, through DeepSpeed's ``engine.compile``).

    In place rather than ``torch.compile(model)``: the module keeps its parameter names (checkpoints, the
    matrix groups and the partition are keyed by them) and its submodules, so the clusterability hooks that
    the partition schedule registers later are traced into the same graph (a new hook, or a changed partition,
    recompiles once). The loss and the optimizer step stay eager. ZeRO-3 is refused by the spec checks.
    """
    engine.compile()


def client_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.Optimizer | None:
    """The AdamW handed to ``deepspeed.initialize`` (which wraps it in its ZeRO optimizer), or None where DeepSpeed
    builds its own from the config (``deepspeed_config.deepspeed_builds_optimizer``). Fused kernels on GPU."""
    import torch

    from orchestrator.train.deepspeed_config import deepspeed_builds_optimizer

    if deepspeed_builds_optimizer(spec):
        return None
    training = spec.training
    return torch.optim.AdamW(
        model.parameters(),
        lr=training.lr,
        weight_decay=training.weight_decay,
        betas=tuple(training.betas),
        fused=spec.resources.use_gpu,
    )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    Non-reentrant checkpointing only: the reentrant kind runs the block's backward in a separate autograd
    pass that silently drops the clusterability term's gradient (the loss value stays right, so nothing shows it);
    the non-reentrant kind keeps it.
    """
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"{type(model).__name__} has no activation checkpointing; set training.activation_checkpointing: false"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

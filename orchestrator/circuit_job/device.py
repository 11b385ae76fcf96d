"""Where the circuits actor computes: on its GPU when Ray gave it one, else on the CPU.

Ray makes an actor's GPUs (``circuits.gpus``) its only visible CUDA devices, so ``cuda`` is the actor's own GPU.
The tasks' examples stay on the CPU where they are built; the model moves its inputs to its own device as it is
called, so every method (attribution, ablation, and the greedy finder's float64 copy, which computes on the CPU)
works on either device unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def circuits_device(gpus: float, cuda_available: bool | None = None) -> torch.device:
    """``cuda`` when the actor was given GPUs and CUDA is visible in it; the CPU otherwise (the default, also
    when a GPU is visible to an actor that was given none: it is some other job's)."""
    visible = torch.cuda.is_available() if cuda_available is None else cuda_available
    return torch.device("cuda") if gpus > 0 and visible else torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device`, taking tensor inputs from wherever they are to wherever its parameters are."""
    model.to(device)
    model.register_forward_pre_hook(_inputs_to_parameters_device, with_kwargs=True)
    return model


def _inputs_to_parameters_device(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Looked up at each call, so a copy of the model moved elsewhere (the greedy finder's) takes its own."""
    device = next(module.parameters()).device
    return (
        tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in args),
        {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()},
    )

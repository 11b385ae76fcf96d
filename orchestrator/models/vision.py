"""The papers' vision models, as their public code builds them: an MNIST MLP and a CIFAR-10 CNN, bias-free, ReLU.

Both end in the same fully connected stack (``in → 64 → 64 → 64 → 10``); its hidden neurons are grouped for
the clusterability loss as (fc1 rows, fc2 columns) and (fc3 rows, fc4 columns), so every fc layer is
regularised once and each group's partition pairs the neurons an in-projection writes with those the next
layer reads.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPES = {"mnist_mlp": (1, 28, 28), "cifar_cnn": (3, 32, 32)}  # [C, H, W] each model takes


def input_shape(family: str) -> tuple[int, int, int]:
    """The image shape ``[C, H, W]`` the family's model takes; the data pipeline resizes to it."""
    if family not in INPUT_SHAPES:
        raise ValueError(f"image data needs a vision model ({', '.join(INPUT_SHAPES)}), not model.family {family!r}")
    return INPUT_SHAPES[family]


class FullyConnectedStack(nn.Module):
    """``in_features → width → width → width → num_classes`` with ReLU between, no biases."""

    def __init__(self, in_features: int, width: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.fc3 = nn.Linear(width, width, bias=False)
        self.fc4 = nn.Linear(width, num_classes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, in_features] -> [B, num_classes]
        hidden = torch.relu(self.fc1(features))
        hidden = torch.relu(self.fc2(hidden))
        hidden = torch.relu(self.fc3(hidden))
        return self.fc4(hidden)


class MnistMLP(nn.Module):
    """784 → 64 → 64 → 64 → 10 on flattened 28x28 grey images."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.classifier = FullyConnectedStack(28 * 28, width, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, 1, 28, 28] -> [B, num_classes]
        return self.classifier(inputs.flatten(1))

    def modularity_groups(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        return _stack_groups("classifier")


class CifarCNN(nn.Module):
    """conv 3→16 3x3 (same padding) + ReLU + 2x2 max-pool, then 4096 → 64 → 64 → 64 → 10."""

    def __init__(self, width: int = 64, num_classes: int = 10, channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, kernel_size=3, padding=1, bias=False)
        self.classifier = FullyConnectedStack(channels * 16 * 16, width, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, num_classes]
        features = torch.max_pool2d(torch.relu(self.conv(inputs)), 2)  # [B, 16, 16, 16]
        return self.classifier(features.flatten(1))

    def modularity_groups(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        return _stack_groups("classifier")


def _stack_groups(prefix: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(group name, in-projections, out-projections) of a FullyConnectedStack, for ``find_matrix_groups``."""
    return [
        (f"{prefix}.hidden1", (f"{prefix}.fc1",), (f"{prefix}.fc2",)),
        (f"{prefix}.hidden3", (f"{prefix}.fc3",), (f"{prefix}.fc4",)),
    ]

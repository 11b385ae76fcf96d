"""Image classification data: MNIST or CIFAR-10 (hub name or local directory), or scikit-learn's digits.

Whatever the source, images come out at the shape the model takes (``models.vision.input_shape``): resized
bilinearly, converted between grey and colour, and standardised with the training images' mean and std.
scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) are the offline stand-in for MNIST.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orchestrator.data.examples import ExampleData, LabelledExamples, split_examples
from orchestrator.data.training_data import DataError

if TYPE_CHECKING:
    import datasets

    from orchestrator.spec import DataSpec, ModelSpec

IMAGE_SOURCES = ("digits", "mnist", "cifar10")
HUB_DATASETS = {"mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10"}  # used when data.dataset is omitted
NUM_CLASSES = 10


def build_image_data(data: DataSpec, model: ModelSpec) -> ExampleData:
    """Training and validation images at the model's input shape, with their classes."""
    from orchestrator.models.vision import input_shape

    if data.source == "digits":
        train, validation = split_examples(digits(), data.validation_fraction, data.seed)
    else:
        train, validation = hub_images(data)
    shape = input_shape(model.family)
    pixels = to_shape(train.inputs, shape)  # [n, C, H, W]
    mean, std = pixels.mean(), pixels.std()
    train = LabelledExamples(standardise(pixels, mean, std), train.labels)
    if validation is not None:
        validation = LabelledExamples(standardise(to_shape(validation.inputs, shape), mean, std), validation.labels)
    return ExampleData(train=train, validation=validation, num_classes=NUM_CLASSES)


def digits() -> LabelledExamples:
    """scikit-learn's 8x8 handwritten digits as [1797, 1, 8, 8] intensities in [0, 1] (bundled: no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8]
    return LabelledExamples(images, torch.as_tensor(bunch.target, dtype=torch.long))


def hub_images(data: DataSpec) -> tuple[LabelledExamples, LabelledExamples | None]:
    """``data.split`` and ``data.validation_split`` of an image dataset (or a held-out share when the latter is
    null)."""
    splits = _load(data)
    missing = [split for split in (data.split, data.validation_split) if split and split not in splits]
    if missing:
        key = "data.split" if data.split in missing else "data.validation_split"
        raise DataError(
            key,
            f"{data.dataset or HUB_DATASETS[data.source]} has no split {missing[0]!r} (it has {', '.join(splits)})",
            f"name one of {', '.join(splits)}",
        )
    train = _examples(splits[data.split])
    if data.validation_split:
        return train, _examples(splits[data.validation_split])
    return split_examples(train, data.validation_fraction, data.seed)


def _load(data: DataSpec) -> datasets.DatasetDict:
    import datasets

    name = data.dataset or HUB_DATASETS[data.source]
    try:
        return datasets.load_dataset(name)
    except Exception as error:  # datasets raises several types for a missing, unreachable or unreadable dataset
        raise DataError(
            "data.dataset",
            f"image dataset {name!r} cannot be loaded ({type(error).__name__}: {error})",
            "name a local directory of the dataset's files (e.g. its Parquet files), a hub dataset "
            "that is cached here (offline, the hub is unreachable), or use data.source: digits",
        ) from error


def _examples(split: datasets.Dataset) -> LabelledExamples:
    """The split's image column as [n, C, H, W] intensities in [0, 1] and its class-label column as [n]."""
    import datasets

    image = next((name for name, kind in split.features.items() if isinstance(kind, datasets.Image)), None)
    label = next((name for name, kind in split.features.items() if isinstance(kind, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise DataError(
            "data.dataset",
            f"expected an image column and a class-label column, found features {dict(split.features)}",
            "use an image classification dataset",
        )
    columns = split.with_format("torch")[:]  # every row, each column one tensor
    pixels = columns[image].float() / 255.0  # [n, H, W] (grey) or [n, H, W, C] (colour)
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)  # [n, C, H, W]
    return LabelledExamples(pixels.contiguous(), columns[label].long())


def to_shape(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images [n, C, H, W] resized and converted (grey <-> colour) to [n, *shape]."""
    channels, height, width = shape
    if images.shape[1] != channels:
        images = images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    if images.shape[2:] != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.contiguous()


def standardise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean) / std.clamp_min(1e-6)

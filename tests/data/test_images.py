"""Image data: scikit-learn's digits offline, an image dataset from local Parquet files, shaped for each model."""

import io

import pytest
import torch

from orchestrator.data import build_training_data
from orchestrator.data.training_data import DataError
from orchestrator.spec import DataSpec, ModelSpec


@pytest.mark.parametrize(("family", "shape"), [("mnist_mlp", (1, 28, 28)), ("cifar_cnn", (3, 32, 32))])
def test_digits_come_at_the_models_shape_standardised(family, shape):
    """The 1,797 digits are split, resized to the model's input shape and standardised on the training images."""
    data = build_training_data(DataSpec(source="digits", validation_fraction=0.1), ModelSpec(family=family))
    assert data.train.inputs.shape == (1617, *shape) and len(data.validation) == 180
    assert data.train.inputs.mean().abs() < 1e-4 and (data.train.inputs.std() - 1).abs() < 1e-3
    assert set(data.train.labels.tolist()) == set(range(10)) and data.num_classes == 10


def write_image_dataset(directory, colour: bool):
    """A tiny image classification dataset in the hub's Parquet layout (train and test files)."""
    import datasets
    from PIL import Image

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB" if colour else "L", (28, 28), (value,) * 3 if colour else value).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split, count in (("train", 40), ("test", 10)):
        rows = {
            "image": [{"bytes": png(10 * (i % 10)), "path": None} for i in range(count)],
            "label": [i % 10 for i in range(count)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(directory / f"{split}-00000.parquet"))


def test_local_image_files_load_as_a_dataset(tmp_path):
    """A local directory in the hub's layout (MNIST-like, grey 28x28) loads for the CNN as colour 32x32."""
    write_image_dataset(tmp_path, colour=False)
    data = build_training_data(
        DataSpec(source="mnist", dataset=str(tmp_path), validation_split="test"), ModelSpec(family="cifar_cnn")
    )
    assert data.train.inputs.shape == (40, 3, 32, 32) and data.validation.inputs.shape == (10, 3, 32, 32)
    assert torch.equal(data.train.labels, torch.arange(40) % 10)
    brightness = data.train.inputs.mean(dim=(1, 2, 3))  # the images' grey levels survive, standardised
    assert torch.all(brightness[1:10] > brightness[:9])


def test_missing_split_names_the_splits_there_are(tmp_path):
    """Asking for a validation split the dataset lacks is a DataError that lists the splits it has."""
    write_image_dataset(tmp_path, colour=True)
    with pytest.raises(DataError, match=r"has no split 'validation'.*(test, train|train, test)"):
        build_training_data(DataSpec(source="cifar10", dataset=str(tmp_path)), ModelSpec(family="cifar_cnn"))


def test_unreachable_dataset_is_a_data_error(tmp_path):
    """A dataset that cannot be loaded (offline, unknown) is a DataError on data.dataset with a fix."""
    with pytest.raises(DataError) as error:
        build_training_data(DataSpec(source="mnist", dataset=str(tmp_path / "absent")), ModelSpec(family="mnist_mlp"))
    assert error.value.key == "data.dataset" and "digits" in error.value.fix

"""xcm's own classifiers by family name: the MNIST MLP, the CIFAR-10 CNN and the modular-addition transformer.

They train from scratch through the same Ray Train + DeepSpeed path as the transformer families; their
sizes default to the papers' and ``model.config`` overrides them (unknown keys are errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from orchestrator.models.dimensions import ModelDimensions
    from orchestrator.spec import ModelSpec

NUM_IMAGE_CLASSES = 10
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist_mlp": {"width": 64},
    "cifar_cnn": {"width": 64, "channels": 16},
    "modular_addition": {"d_model": 128, "n_heads": 4, "d_mlp": 128, "regularise_attention": True},
}
CLASSIFIER_FAMILIES = tuple(DEFAULTS)


def classifier_config(spec: ModelSpec) -> dict[str, Any]:
    """The family's defaults with ``model.config`` applied; raises ValueError naming unknown keys."""
    defaults = DEFAULTS[spec.family]
    unknown = sorted(set(spec.config) - set(defaults))
    if unknown:
        raise ValueError(
            f"model family {spec.family} has no key(s) {', '.join(unknown)} (it takes {', '.join(defaults)})"
        )
    return {**defaults, **spec.config}


def build_classifier(spec: ModelSpec, vocab_size: int | None, seed: int) -> torch.nn.Module:
    """The family's model with random weights, seeded identically on every rank."""
    import torch

    from orchestrator.models.modular_addition import ModularAdditionTransformer
    from orchestrator.models.vision import CifarCNN, MnistMLP

    config = classifier_config(spec)
    torch.manual_seed(seed)
    if spec.family == "mnist_mlp":
        return MnistMLP(num_classes=NUM_IMAGE_CLASSES, **config)
    if spec.family == "cifar_cnn":
        return CifarCNN(num_classes=NUM_IMAGE_CLASSES, **config)
    if vocab_size is None:
        raise ValueError("the modular-addition transformer needs token data (data.source: modular_addition)")
    return ModularAdditionTransformer(vocab_size=vocab_size, **config)


def classifier_dimensions(spec: ModelSpec) -> ModelDimensions:
    """Sizes for the spec checks: ``intermediate`` is the narrowest regularised side, which bounds k."""
    from orchestrator.models.dimensions import ModelDimensions

    config = classifier_config(spec)
    if spec.family == "modular_addition":
        groups = 2 if config["regularise_attention"] else 1
        return ModelDimensions(
            hidden=config["d_model"], intermediate=config["d_mlp"], max_positions=3, layers=groups, vocab_size=0
        )
    return ModelDimensions(
        hidden=config["width"],
        intermediate=min(config["width"], NUM_IMAGE_CLASSES),
        max_positions=0,
        layers=2,
        vocab_size=0,
    )

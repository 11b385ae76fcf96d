"""Training-side bad input is a spec problem, found before any worker starts, naming the key and the fix."""

import json

import pytest

from orchestrator.spec import SpecError
from orchestrator.train.preflight import cpu_fp16_supported, require_precision_support
from tests.helpers import tiny_spec


def problems(*overrides: str) -> dict[str, str]:
    """{key: message + fix} of every problem loading jobs/tiny.yaml with the overrides raises (empty when valid)."""
    try:
        tiny_spec("evaluation.every_steps=0", *overrides)
    except SpecError as error:
        return {problem.key: f"{problem.message}. Fix: {problem.fix}" for problem in error.problems}
    return {}


def test_shipped_classifier_jobs_and_options_are_valid():
    """Every new option, and each classifier with its own data, loads without a problem."""
    assert (
        problems(
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.param_persistence_threshold=0",
            "training.lr_schedule=cosine",
            "training.warmup_steps=5",
            "training.activation_checkpointing=true",
            "training.precision=bf16",
        )
        == {}
    )
    assert problems("model.family=cifar_cnn", "data.source=digits") == {}
    assert problems("model.family=modular_addition", "data.source=modular_addition") == {}
    assert problems("model.family=mnist_mlp", "data.source=digits", "evaluation.every_steps=5") == {}


def test_model_and_data_must_fit_each_other():
    """A language model on images, or an image model on text, is refused with the families that fit."""
    assert "mnist_mlp or cifar_cnn" in problems("data.source=digits")["model.family"]
    assert "gpt2 or gpt_neox or gemma" in problems("model.family=mnist_mlp")["model.family"]
    assert "modular_addition" in problems("model.family=mnist_mlp", "data.source=modular_addition")["model.family"]


def test_own_models_refuse_options_they_cannot_take():
    """xcm's classifiers train from scratch, without activation checkpointing."""
    found = problems(
        "model.family=mnist_mlp",
        "data.source=digits",
        "model.init=pretrained",
        "model.pretrained=x",
        "training.activation_checkpointing=true",
    )
    assert {"model.init", "training.activation_checkpointing"} <= set(found)


def test_zero_options_need_their_stage():
    """Optimizer offload needs ZeRO 1-3; the persistence threshold is ZeRO-3's alone."""
    found = problems(
        "deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true", "deepspeed.param_persistence_threshold=0"
    )
    assert "stage 1, 2 or 3" in found["deepspeed.offload_optimizer"]
    assert "zero_stage: 3" in found["deepspeed.param_persistence_threshold"]
    assert "less than or equal to 3" in problems("deepspeed.zero_stage=4")["deepspeed.zero_stage"]


def test_warmup_longer_than_training_is_refused():
    """Warm-up must end before the last step, or the job never trains at its learning rate."""
    assert "below training.steps=60" in problems("training.warmup_steps=60")["training.warmup_steps"]


def test_a_dataset_the_workers_cannot_split_is_refused():
    """Too few examples for one micro-batch per worker is refused before start, with the largest batch that fits."""
    found = problems(
        "model.family=modular_addition",
        "data.source=modular_addition",
        "data.modulus=7",
        "data.validation_fraction=0.5",
        "training.micro_batch_size=16",
    )
    assert "25 training examples split over 2 workers leave 12 each" in found["training.micro_batch_size"]
    assert "<= 12" in found["training.micro_batch_size"]


def test_unknown_pretrained_model_is_refused(tmp_path, monkeypatch):
    """A missing directory, a model of another family, and an uncached hub model offline are each refused."""
    found = problems("model.init=pretrained", "model.pretrained=/absent/gpt2")
    assert "no model directory" in found["model.pretrained"]
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": 64,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            }
        )
    )
    found = problems("model.init=pretrained", f"model.pretrained={tmp_path}")
    assert "is a 'gpt_neox' model, not gpt2" in found["model.family"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = problems("model.init=pretrained", "model.pretrained=nobody/no-such-model")
    assert "not in the local cache" in found["model.pretrained"]


def test_worker_without_a_gpu_stops_before_building():
    """A worker of a GPU job that sees no CUDA GPU stops at once, naming the key and the fix (bf16 is checked next)."""
    spec = tiny_spec("training.precision=bf16", "resources.gpus_per_worker=1")
    with pytest.raises(
        RuntimeError, match=r"resources\.gpus_per_worker: the job asks for GPUs but this worker sees none"
    ):
        require_precision_support(spec)
    require_precision_support(tiny_spec("training.precision=bf16"))  # CPU bf16: fine


@pytest.mark.skipif(cpu_fp16_supported(), reason="this CPU computes fp16 natively, and DeepSpeed takes fp16 on it")
def test_fp16_on_a_cpu_without_native_fp16_is_refused_by_driver_and_worker():
    """fp16 on CPU workers is a spec problem where the CPU lacks native fp16 (DeepSpeed would refuse it only inside
    initialize); a worker whose CPU lacks it stops at once, with the same fix. A GPU job's fp16 is its GPU's."""
    assert "bf16 or fp32" in problems("training.precision=fp16")["training.precision"]
    assert problems("training.precision=fp16", "resources.gpus_per_worker=1") == {}
    spec = tiny_spec()
    fp16 = spec.model_copy(update={"training": spec.training.model_copy(update={"precision": "fp16"})})
    with pytest.raises(RuntimeError, match=r"training\.precision: fp16 on CPU needs native fp16.*Fix: use .*bf16"):
        require_precision_support(fp16)

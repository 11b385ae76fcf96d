"""Transformer families by name: a config from a preset (or a pretrained model), then the model.

Presets keep the tiny model first-class: ``tiny`` (2 layers, width 64) is what tests and the default job
train on CPU; ``small`` is the family's smallest published size (GPT-2 124M, Pythia-70m, Gemma-2B).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from orchestrator.models.dimensions import ModelDimensions

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from orchestrator.spec import ModelSpec

# Each family's transformers config classes: the first builds a random model; a pretrained one may be any of them.
CONFIG_CLASSES = {
    "gpt2": ("GPT2Config",),
    "gpt_neox": ("GPTNeoXConfig",),
    "gemma": ("GemmaConfig", "Gemma2Config", "Gemma3TextConfig"),
}
# PyTorch's scaled_dot_product_attention, which every family here supports: on a GPU in bf16 / fp16 it runs the
# FlashAttention-2 kernel itself (no flash_attn package to build against the CUDA toolkit), on CPU a fused kernel.
# Named rather than left to transformers' default, which has changed between releases and would fall back silently.
ATTENTION = "sdpa"
# Zero dropout everywhere: modularity measurements and resume-equality checks need deterministic forwards.
PRESETS: dict[str, dict[str, dict]] = {
    "gpt2": {
        "tiny": {
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "n_positions": 128,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        "small": {
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "n_positions": 1024,
            "vocab_size": 50257,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    },
    "gpt_neox": {
        "tiny": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 256,
            "max_position_embeddings": 128,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "small": {
            "num_hidden_layers": 6,
            "hidden_size": 512,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
            "max_position_embeddings": 2048,
            "vocab_size": 50304,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
    },
    "gemma": {
        "tiny": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 128,
        },
        "small": {
            "num_hidden_layers": 18,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "max_position_embeddings": 8192,
            "vocab_size": 256000,
        },
    },
}


def model_config(spec: ModelSpec, vocab_size: int | None = None) -> PretrainedConfig:
    """The transformers config the spec describes; ``vocab_size`` (the tokenizer's) fills a preset's gap."""
    import transformers

    from orchestrator.models.classifiers import CLASSIFIER_FAMILIES

    if spec.family in CLASSIFIER_FAMILIES:
        raise ValueError(f"model family {spec.family} is one of xcm's own classifiers, not a transformers model")
    if spec.init == "pretrained":
        config = transformers.AutoConfig.from_pretrained(spec.pretrained)
        for key, value in spec.config.items():
            setattr(config, key, value)
        return config
    config_class = getattr(transformers, CONFIG_CLASSES[spec.family][0])
    values = dict(PRESETS[spec.family][spec.size])
    if vocab_size is not None and "vocab_size" not in values:
        # Sized to xcm's own tokenizer: the family's special-token ids would fall outside that vocabulary.
        values.update(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    values.update(spec.config)
    unknown = sorted(set(spec.config) - config_keys(config_class))
    if unknown:
        raise ValueError(f"{config_class.__name__} has no key(s) {', '.join(unknown)}")
    return config_class(**values)


@functools.cache
def config_keys(config_class: type[PretrainedConfig]) -> frozenset[str]:
    """The keys a transformers config class reads: its constructor's parameters, the attributes a default
    instance holds (PretrainedConfig's common ones among them) and the class's aliases (GPT-2's hidden_size for
    n_embd). Built from the class alone, offline. The constructor itself takes any key silently: a typo such as
    n_embed would train the preset's width."""
    import inspect

    parameters = inspect.signature(config_class.__init__).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    keys = named | set(config_class().to_dict()) | set(config_class.attribute_map)
    return frozenset(key for key in keys if not key.startswith("_"))


def model_dimensions(spec: ModelSpec) -> ModelDimensions:
    """The sizes that spec checks need, read from the config without building the model."""
    from orchestrator.models.classifiers import CLASSIFIER_FAMILIES, classifier_dimensions

    if spec.family in CLASSIFIER_FAMILIES:
        return classifier_dimensions(spec)
    config = model_config(spec)
    if config.model_type == "gpt2":  # by the config, which a pretrained model of another family may not match
        return ModelDimensions(
            hidden=config.n_embd,
            intermediate=config.n_inner or 4 * config.n_embd,
            max_positions=config.n_positions,
            layers=config.n_layer,
            vocab_size=config.vocab_size,
        )
    return ModelDimensions(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        max_positions=config.max_position_embeddings,
        layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
    )


def build_model(spec: ModelSpec, vocab_size: int | None, seed: int) -> torch.nn.Module:
    """A causal LM: ``from_pretrained`` for init: pretrained, else random weights seeded identically on every rank.
    xcm's own classifier families are built by ``models.classifiers`` (``vocab_size`` None for image inputs)."""
    import torch
    import transformers

    from orchestrator.models.classifiers import CLASSIFIER_FAMILIES, build_classifier

    if spec.family in CLASSIFIER_FAMILIES:
        return build_classifier(spec, vocab_size, seed)
    if spec.init == "pretrained":
        return transformers.AutoModelForCausalLM.from_pretrained(
            spec.pretrained, config=model_config(spec), attn_implementation=ATTENTION
        )
    config = model_config(spec, vocab_size=vocab_size)
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}: remove model.config.vocab_size or raise it to >= {vocab_size}"
        )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)

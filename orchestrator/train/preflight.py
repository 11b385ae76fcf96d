"""Training-side problems of a job spec, found before any worker starts (``train.job_checks`` calls them).

Covers what the model, the data kind, the ZeRO options, the precision and the batch geometry must agree on.
bf16 on GPUs: the driver checks ``torch.cuda.is_bf16_supported()`` when it sees a GPU itself; on a cluster whose
driver has none (a CPU head node), the workers' GPUs cannot be asked from here, so every worker checks its own
before it builds anything (``require_precision_support``) and fails the run at once with the same message.
fp16 on CPU workers (DeepSpeed allows it only on CPUs with native fp16) is checked on both sides the same way.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec, SpecProblem

TRANSFORMER_FAMILIES = ("gpt2", "gpt_neox", "gemma")
# Which model families can train on which data sources (text sources need a language model).
FAMILIES_OF_SOURCE = {
    "digits": ("mnist_mlp", "cifar_cnn"),
    "mnist": ("mnist_mlp", "cifar_cnn"),
    "cifar10": ("mnist_mlp", "cifar_cnn"),
    "modular_addition": ("modular_addition",),
}
# Training examples of the sources whose size the spec alone fixes (before the validation hold-out).
DIGITS_EXAMPLES = 1797


def training_spec_problems(spec: JobSpec) -> list[SpecProblem]:
    """Every training-side problem of ``spec`` (an empty list when it can run)."""
    return [
        *_model_data_problems(spec),
        *_pretrained_problems(spec),
        *model_config_problems(spec),
        *_zero_problems(spec),
        *_compile_problems(spec),
        *_schedule_problems(spec),
        *_batch_split_problems(spec),
        *_precision_problems(spec),
    ]


def _problem(key: str, message: str, fix: str) -> SpecProblem:
    from orchestrator.spec import SpecProblem

    return SpecProblem(key=key, message=message, fix=fix)


def _model_data_problems(spec: JobSpec) -> list[SpecProblem]:
    from orchestrator.spec import TEXT_SOURCES

    model, source, problems = spec.model, spec.data.source, []
    families = TRANSFORMER_FAMILIES if source in TEXT_SOURCES else FAMILIES_OF_SOURCE[source]
    if model.family not in families:
        problems.append(
            _problem(
                "model.family",
                f"{model.family} cannot train on data.source {source}",
                f"use model.family {' or '.join(families)} for this source, or another source",
            )
        )
    if model.family not in TRANSFORMER_FAMILIES:
        if model.init == "pretrained":
            problems.append(
                _problem(
                    "model.init",
                    f"{model.family} is one of xcm's own models, trained from scratch",
                    "set model.init: random",
                )
            )
        if spec.training.activation_checkpointing:
            problems.append(
                _problem(
                    "training.activation_checkpointing",
                    f"{model.family} is too small to need it and has no checkpointed blocks",
                    "set training.activation_checkpointing: false",
                )
            )
    return problems


def _pretrained_problems(spec: JobSpec) -> list[SpecProblem]:
    """A pretrained model must be found (a local directory, or a hub name, cached when offline) and be of the family."""
    import os
    from pathlib import Path

    model = spec.model
    if model.init != "pretrained" or not model.pretrained or model.family not in TRANSFORMER_FAMILIES:
        return []
    name = model.pretrained
    if Path(name).expanduser().is_dir():
        return _pretrained_config_problems(spec)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return [
            _problem(
                "model.pretrained",
                f"no model directory at {name}",
                "name an existing directory (with config.json) or a hub model such as openai-community/gpt2",
            )
        ]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return [
                _problem(
                    "model.pretrained",
                    f"hub model {name!r} is not in the local cache and the hub is offline (HF_HUB_OFFLINE)",
                    "download it once where the hub is reachable, or name a local directory",
                )
            ]
        return _pretrained_config_problems(spec)
    return []  # a hub model that may be fetched: its config is checked when the workers load it


def _pretrained_config_problems(spec: JobSpec) -> list[SpecProblem]:
    from orchestrator.models.registry import model_config

    try:
        model_type = model_config(spec.model).model_type
    except (OSError, ValueError) as error:
        return [
            _problem(
                "model.pretrained",
                f"{spec.model.pretrained} holds no usable transformers config ({error})",
                "name a directory saved with save_pretrained, or a hub model",
            )
        ]
    accepted = {"gpt2": ("gpt2",), "gpt_neox": ("gpt_neox",), "gemma": ("gemma", "gemma2", "gemma3_text")}
    if model_type in accepted[spec.model.family]:
        return []
    return [
        _problem(
            "model.family",
            f"{spec.model.pretrained} is a {model_type!r} model, not {spec.model.family}",
            f"set model.family to the model's family, or name a {spec.model.family} model",
        )
    ]


def model_config_problems(spec: JobSpec) -> list[SpecProblem]:
    """Each ``model.config`` key must be one the model reads, with a value it takes: a transformers config takes
    any key silently, so a typo would train the preset's size, and a value of the wrong type, like any value
    that xcm's own models cannot take, would fail only in the workers."""
    known = _known_config_keys(spec)
    if known is None:
        return []
    owner, keys = known
    problems = []
    for key in spec.model.config:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
            problems.append(
                _problem(
                    f"model.config.{key}",
                    f"{owner} has no key {key!r}" + (f" (close matches: {', '.join(close)})" if close else ""),
                    f"use {close[0]}"
                    if close
                    else f"remove it, or use a key of {owner} (its transformers documentation lists them)",
                )
            )
    return problems or _config_value_problems(spec, owner)


def _config_value_problems(spec: JobSpec, owner: str) -> list[SpecProblem]:
    """Values that are not finite, not of the type the model's config declares, or (xcm's own models: sizes and
    switches) not a positive integer or a boolean."""
    import math

    from orchestrator.models.classifiers import DEFAULTS

    model = spec.model
    non_finite = [
        _problem(f"model.config.{key}", "not a finite number", "give a finite value")
        for key, value in model.config.items()
        if any(isinstance(item, float) and not math.isfinite(item) for item in _leaves(value))
    ]
    if non_finite:
        return non_finite
    if model.family not in TRANSFORMER_FAMILIES:
        return [
            _problem(
                f"model.config.{key}",
                f"{owner} takes {_kind(DEFAULTS[model.family][key])} here, not {value!r}"[:200],
                f"give {_kind(DEFAULTS[model.family][key])}",
            )
            for key, value in model.config.items()
            if not _fits(value, DEFAULTS[model.family][key])
        ]
    return _transformers_value_problems(spec, owner)


def _kind(default) -> str:
    return "true or false" if isinstance(default, bool) else "a positive integer"


def _fits(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _transformers_value_problems(spec: JobSpec, owner: str) -> list[SpecProblem]:
    """The config class validates each field's type when it is built (a strict dataclass): build it here, where
    it needs no download (a random model, or a pretrained one in a local directory)."""
    import re
    from pathlib import Path

    from huggingface_hub.errors import StrictDataclassError

    from orchestrator.models.registry import model_config

    model = spec.model
    if model.init == "pretrained" and not (model.pretrained and Path(model.pretrained).expanduser().is_dir()):
        return []
    try:
        model_config(model)
    except StrictDataclassError as error:
        first, _, cause = str(error).partition("\n")
        field = re.search(r"field '(\w+)'", first)
        key = f"model.config.{field[1]}" if field and field[1] in model.config else "model.config"
        return [_problem(key, f"{owner} refuses it ({cause.strip()[:200]})", "give a value of the type named")]
    except (OSError, ValueError):
        return []  # the other model checks report a config that cannot be read
    return []


def _known_config_keys(spec: JobSpec) -> tuple[str, frozenset[str]] | None:
    """Who reads ``model.config`` and its keys: the family's transformers config class (for a pretrained model,
    the class of its own config, or of any of the family's classes while it is not downloaded), or the keys of
    one of xcm's own models. None when the pretrained model's config cannot be read (reported elsewhere)."""
    from pathlib import Path

    import transformers

    from orchestrator.models.classifiers import DEFAULTS
    from orchestrator.models.registry import CONFIG_CLASSES, config_keys

    model = spec.model
    if model.family not in TRANSFORMER_FAMILIES:
        return f"xcm's {model.family} model", frozenset(DEFAULTS[model.family])
    if model.init == "random" or not model.pretrained:
        names = CONFIG_CLASSES[model.family][:1]
    elif Path(model.pretrained).expanduser().is_dir():
        try:
            names = (type(transformers.AutoConfig.from_pretrained(model.pretrained)).__name__,)
        except (OSError, ValueError):
            return None
    else:
        names = CONFIG_CLASSES[model.family]
    keys = frozenset().union(*(config_keys(getattr(transformers, name)) for name in names))
    return " / ".join(names), keys


def _leaves(value):
    """The scalars of a ``model.config`` value (rope_parameters and the like are mappings)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _zero_problems(spec: JobSpec) -> list[SpecProblem]:
    zero, problems = spec.deepspeed, []
    if zero.offload_optimizer and zero.zero_stage == 0:
        problems.append(
            _problem(
                "deepspeed.offload_optimizer",
                "optimizer offload needs ZeRO stage 1, 2 or 3",
                "set deepspeed.zero_stage >= 1, or offload_optimizer: false",
            )
        )
    if zero.param_persistence_threshold is not None and zero.zero_stage != 3:
        problems.append(
            _problem(
                "deepspeed.param_persistence_threshold",
                f"only ZeRO-3 shards parameters, but zero_stage is {zero.zero_stage}",
                "set deepspeed.zero_stage: 3, or remove param_persistence_threshold",
            )
        )
    return problems


def _compile_problems(spec: JobSpec) -> list[SpecProblem]:
    """ZeRO-3 gathers and releases each parameter around its module's forward through hooks DeepSpeed keeps out of
    the compiled graph, while the clusterability loss reads the gathered weight inside a forward hook of its own:
    every regularised module would break the graph, and that pairing has no equality test against eager. ZeRO 0-2
    keep the weights whole, so the loss compiles with the model (tests/train/test_compile.py)."""
    if spec.training.compile and spec.deepspeed.zero_stage == 3:
        return [
            _problem(
                "training.compile",
                "compiling is supported at ZeRO stages 0-2, not at ZeRO-3 (its parameter gathering around each "
                "module is where the clusterability loss reads the weights)",
                "set deepspeed.zero_stage <= 2, or training.compile: false",
            )
        ]
    return []


def _schedule_problems(spec: JobSpec) -> list[SpecProblem]:
    training = spec.training
    if training.warmup_steps < training.steps:
        return []
    return [
        _problem(
            "training.warmup_steps",
            f"{training.warmup_steps} warm-up steps leave none of the {training.steps} steps at full lr",
            f"choose warmup_steps below training.steps={training.steps}",
        )
    ]


def _batch_split_problems(spec: JobSpec) -> list[SpecProblem]:
    """A dataset whose size the spec fixes must give every worker at least one micro-batch per epoch."""
    data, workers, batch = spec.data, spec.resources.max_workers, spec.training.micro_batch_size
    total = {"digits": DIGITS_EXAMPLES, "modular_addition": data.modulus**2}.get(data.source)
    if total is None:
        return []  # text is packed and hub images counted only once loaded: the data check does those
    train = total - round(total * data.validation_fraction)
    if train // workers >= batch:
        return []
    return [
        _problem(
            "training.micro_batch_size",
            f"{train} training examples split over {workers} workers leave {train // workers} each, "
            f"fewer than one micro-batch of {batch}",
            f"lower training.micro_batch_size to <= {max(train // workers, 1)} or resources.num_workers, "
            "or hold out less (data.validation_fraction)",
        )
    ]


def _precision_problems(spec: JobSpec) -> list[SpecProblem]:
    if spec.resources.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return []  # the driver sees no GPU: the workers check theirs (require_precision_support)
    problem = _local_precision_problem(spec)
    return [problem] if problem else []


def _local_precision_problem(spec: JobSpec) -> SpecProblem | None:
    """What this process's own hardware cannot compute of the job's precision: the one check the driver (as a spec
    problem) and every worker (as an error) make. bf16 runs on any CPU torch supports (natively with
    AVX512-BF16/AMX, emulated otherwise); fp16 on a CPU only where DeepSpeed takes it."""
    precision = spec.training.precision
    if not spec.resources.use_gpu:
        return _cpu_fp16_problem() if precision == "fp16" and not cpu_fp16_supported() else None
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return _bf16_problem(torch.cuda.get_device_name())
    return None


def _bf16_problem(device_name: str) -> SpecProblem:
    return _problem(
        "training.precision",
        f"bf16 is not supported by {device_name} (it needs compute capability 8.0+, e.g. A100, H100, L4, RTX 30xx)",
        "use precision fp16 (with loss scaling) or fp32 on this GPU",
    )


def cpu_fp16_supported() -> bool:
    """Whether this CPU computes fp16 natively (AVX512-FP16 or AMX-FP16): DeepSpeed's CPU accelerator asks oneDNN
    the same question and refuses fp16 where the answer is no."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def _cpu_fp16_problem() -> SpecProblem:
    return _problem(
        "training.precision",
        "fp16 on CPU needs native fp16 (AVX512-FP16 or AMX-FP16), which this CPU lacks (DeepSpeed refuses it)",
        "use precision bf16 or fp32 on this CPU, or set resources.gpus_per_worker for a GPU",
    )


def require_precision_support(spec: JobSpec) -> None:
    """In a worker, before anything is built: stop at once when its GPU (or CPU) cannot compute in the job's
    precision."""
    import torch

    if spec.resources.use_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            f"resources.gpus_per_worker: the job asks for GPUs but this worker sees none (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}). Fix: install a CUDA build of torch on "
            "the GPU nodes, or set resources.gpus_per_worker: 0"
        )
    problem = _local_precision_problem(spec)
    if problem:
        raise RuntimeError(f"{problem.key}: {problem.message}. Fix: {problem.fix}")

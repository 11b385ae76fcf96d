"""The job spec: shipped jobs validate, bad files fail before anything starts with every problem listed."""

from pathlib import Path

import pytest

from orchestrator.spec import JobSpec, SpecError
from orchestrator.train.job_checks import load_spec

JOBS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=lambda path: path.name)
def test_every_shipped_job_validates(job):
    """Every file in jobs/ loads into a JobSpec without problems; offline (as in the tests), the GPU jobs that
    fine-tune a hub model fail on that alone, and the rest of each (k, block size, partitioner actors) fits the
    family's published size."""
    try:
        assert isinstance(load_spec(job), JobSpec)
    except SpecError as error:
        found = [(problem.key, "not in the local cache" in problem.message) for problem in error.problems]
        assert found == [("model.pretrained", True)], error  # noqa: PT017 - valid or failing on this alone
        assert isinstance(load_spec(job, ["model.init=random", "model.size=small"]), JobSpec)


def test_default_job_is_tiny_gpt2_on_zero2():
    """The default job trains the tiny GPT-2 with 2 workers under ZeRO-2 and the loss on."""
    spec = load_spec(Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml")
    assert (spec.model.family, spec.model.size, spec.deepspeed.zero_stage) == ("gpt2", "tiny", 2)
    assert spec.resources.num_workers == 2 and spec.modularity.lambda_ > 0


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_all_field_problems_are_listed_at_once_with_lines_and_fixes(tmp_path):
    """Unknown keys and wrong types are reported together, one line each naming the file, line, key and a fix."""
    path = write(tmp_path, "name: ok\nmodel:\n  famly: gpt2\ntraining:\n  steps: -3\n  lr: fast\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = {problem.key: problem for problem in caught.value.problems}
    assert set(problems) == {"model.famly", "training.steps", "training.lr"}
    assert problems["model.famly"].line == 3 and "family" in problems["model.famly"].fix
    assert problems["training.lr"].line == 6
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{path}:3: model.famly: unknown key. Fix: ")


def test_inconsistent_values_are_listed_at_once(tmp_path):
    """Values valid alone but inconsistent together (k too large, partition after the end) all fail."""
    path = write(
        tmp_path, "training:\n  steps: 10\nmodularity:\n  k: 1000\n  partition_at_step: 10\ndata:\n  block_size: 4096\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    keys = {problem.key for problem in caught.value.problems}
    assert keys == {"modularity.k", "modularity.partition_at_step", "data.block_size"}


def test_pretrained_without_name_fails(tmp_path):
    """A pretrained init without a model name is rejected with its fix."""
    path = write(tmp_path, "model:\n  init: pretrained\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    fixes = {problem.key: problem.fix for problem in caught.value.problems}
    assert "model.pretrained" in fixes["model.pretrained"]


def test_zero_stage_outside_range_fails(tmp_path):
    """A ZeRO stage outside 0-3 is a spec error."""
    with pytest.raises(SpecError, match=r"deepspeed\.zero_stage"):
        load_spec(write(tmp_path, "deepspeed:\n  zero_stage: 4\n"))


def test_malformed_yaml_and_missing_file_are_clear(tmp_path):
    """Broken YAML names its line; a missing file names the path and the fix."""
    with pytest.raises(SpecError, match="not valid YAML") as caught:
        load_spec(write(tmp_path, "model:\n  family: [gpt2\n"))
    assert caught.value.problems[0].line is not None
    with pytest.raises(SpecError, match="no job file"):
        load_spec(tmp_path / "absent.yaml")


def test_overrides_are_validated_like_the_file(tmp_path):
    """--set overrides change values and go through the same validation."""
    path = write(tmp_path, "training:\n  steps: 10\n")
    assert load_spec(path, ["training.steps=30", "modularity.lambda=0"]).training.steps == 30
    with pytest.raises(SpecError, match=r"training\.steps"):
        load_spec(path, ["training.steps=zero"])


def test_resolved_spec_has_absolute_local_store(tmp_path):
    """With no tracking URI, the run uses a SQLite store and checkpoints under the working directory."""
    spec = JobSpec().resolved(tmp_path)
    assert spec.tracking.uri == f"sqlite:///{tmp_path.resolve() / 'xcm-runs' / 'mlflow.db'}"
    assert Path(spec.checkpointing.storage_path).is_absolute()
    assert spec.flat_params()["modularity.lambda"] == "20.0"


@pytest.mark.parametrize(
    ("family", "key", "close"),
    [
        ("gpt2", "n_embed", "n_embd"),
        ("gpt_neox", "hidden_sise", "hidden_size"),
        ("gemma", "num_kv_heads", "num_key_value_heads"),
    ],
)
def test_model_config_keys_are_checked_against_the_family_config_class(tmp_path, family, key, close):
    """A model.config key the family's transformers config class does not take (which its constructor would
    silently keep) is refused with its line and the close matches."""
    path = write(tmp_path, f"model:\n  family: {family}\n  config:\n    {key}: 32\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert [(problem.key, problem.line) for problem in caught.value.problems] == [(f"model.config.{key}", 4)]
    assert close in caught.value.problems[0].message and caught.value.problems[0].fix == f"use {close}"


def test_model_config_accepts_the_class_keys_and_aliases(tmp_path):
    """Constructor keys, PretrainedConfig's common keys and GPT-2's aliases (hidden_size for n_embd) all load."""
    path = write(tmp_path, "model:\n  config:\n    n_inner: 128\n    tie_word_embeddings: false\n    hidden_size: 64\n")
    assert load_spec(path).model.config["hidden_size"] == 64


def test_own_model_config_keys_are_checked(tmp_path):
    """xcm's own classifiers take only their own keys: a misspelt one is refused with the right spelling."""
    path = write(tmp_path, "model:\n  family: mnist_mlp\n  config:\n    widht: 32\ndata:\n  source: digits\n")
    with pytest.raises(
        SpecError,
        match=r"job.yaml:4: model.config.widht: xcm's mnist_mlp model has no key "
        r"'widht' \(close matches: width\)",
    ):
        load_spec(path)


def test_pretrained_model_config_keys_follow_its_own_config(tmp_path):
    """For a local pretrained model, model.config is checked against the class of the model's own config."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "model")
    path = write(
        tmp_path,
        f"model:\n  init: pretrained\n  pretrained: {tmp_path / 'model'}\n  config:\n"
        "    resid_pdrop: 0.0\n    n_embed: 3\n",
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert [problem.key for problem in caught.value.problems] == ["model.config.n_embed"]


def test_keys_mlflow_cannot_name_are_refused_before_a_run_exists(tmp_path):
    """A key nested in model.config becomes an MLflow param: one MLflow would refuse (here with a '|', and one that
    path normalisation changes) is a spec problem, not a run that fails after it was created."""
    path = write(tmp_path, "model:\n  config:\n    id2label:\n      'a|b': x\n      'c//d': y\n      ok: z\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = {problem.key: problem.line for problem in caught.value.problems}
    assert problems == {"model.config.id2label.a|b": 4, "model.config.id2label.c//d": 5}


@pytest.mark.parametrize(
    ("config", "key", "expected"),
    [
        ("{n_layer: [1, 2]}", "model.config.n_layer", "expected int, got list"),
        ("{activation_function: 5}", "model.config.activation_function", "expected str, got int"),
    ],
)
def test_model_config_values_of_the_wrong_type_are_refused(tmp_path, config, key, expected):
    """A value the family's config class refuses when built (transformers' strict dataclass fields) is a spec
    problem naming the key, not a traceback."""
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, f"model:\n  config: {config}\n"))
    [problem] = caught.value.problems
    assert problem.key == key and expected in problem.message


def test_own_model_config_values_must_be_positive_sizes_and_switches(tmp_path):
    """xcm's own models take positive integer sizes and true/false switches in model.config."""
    path = write(
        tmp_path,
        "model:\n  family: modular_addition\n  config: {regularise_attention: 1, d_mlp: 0, "
        "d_model: '64'}\ndata:\n  source: modular_addition\n",
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert {problem.key for problem in caught.value.problems} == {
        "model.config.regularise_attention",
        "model.config.d_mlp",
        "model.config.d_model",
    }


def test_elastic_worker_range_is_accepted_with_accumulation_per_size(tmp_path):
    """`num_workers: [min, max]` loads as a pair; the global batch is defined at max, and each size's gradient
    accumulation keeps it."""
    path = write(tmp_path, "resources:\n  num_workers: [2, 4]\ntraining:\n  gradient_accumulation_steps: 3\n")
    spec = load_spec(path)
    resources, training = spec.resources, spec.training
    assert (resources.num_workers, resources.elastic, resources.min_workers, resources.max_workers) == (
        (2, 4),
        True,
        2,
        4,
    )
    global_batches = {
        n * spec.on_workers(n).training.gradient_accumulation_steps * training.micro_batch_size for n in (2, 3, 4)
    }
    assert global_batches == {4 * 3 * training.micro_batch_size}
    assert load_spec(path, ["resources.num_workers=3"]).on_workers(3) == load_spec(path, ["resources.num_workers=3"])


def test_elastic_range_out_of_order_is_refused_in_one_line(tmp_path):
    """`[max, min]` is refused naming the key and the pair written the right way round."""
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, "resources:\n  num_workers: [4, 2]\n"))
    [problem] = caught.value.problems
    assert problem.key == "resources.num_workers" and "min 4 is above max 2" in problem.message
    assert "[2, 4]" in problem.message


def test_elastic_sizes_that_break_the_global_batch_are_refused_with_a_fix(tmp_path):
    """`[4, 8]` with accumulation 1 cannot keep 8 micro-batches at 5, 6 or 7 workers: one line names those sizes,
    and both proposed fixes load."""
    path = write(tmp_path, "resources:\n  num_workers: [4, 8]\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    [problem] = caught.value.problems
    assert problem.key == "resources.num_workers" and problem.message.startswith("5, 6, 7 workers cannot keep")
    assert "num_workers [8, 8]" in problem.fix and "gradient_accumulation_steps: 105" in problem.fix
    assert load_spec(path, ["resources.num_workers=[8, 8]"]).resources.min_workers == 8
    fixed = load_spec(path, ["training.gradient_accumulation_steps=105"])
    assert {n * fixed.on_workers(n).training.gradient_accumulation_steps for n in range(4, 9)} == {840}


def test_elastic_range_without_zero_is_refused(tmp_path):
    """An elastic group resizes through the universal checkpoint, so ZeRO-0 is refused with the stages that work."""
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, "resources:\n  num_workers: [1, 2]\ndeepspeed:\n  zero_stage: 0\n"))
    [problem] = caught.value.problems
    assert problem.key == "resources.num_workers" and "ZeRO 1-3" in problem.message

"""Bad data input is a job-spec error naming the key and the fix, found before any worker or MLflow run starts."""

import json
import os

import pytest

from orchestrator.data.preflight import check_data
from orchestrator.spec import SpecError
from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job
from tests.helpers import tiny_spec


def job(tmp_path, *overrides):
    return tiny_spec(*overrides).resolved(tmp_path)


def problems_of(spec) -> dict:
    with pytest.raises(SpecError) as caught:
        check_data(spec)
    return {problem.key: problem for problem in caught.value.problems}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_missing_files_are_all_listed_and_no_run_starts(tmp_path, monkeypatch):
    """Every pattern that names no file is reported; run_job raises before creating an MLflow store or Ray."""
    monkeypatch.chdir(tmp_path)
    spec = job(
        tmp_path,
        "data.source=files",
        "data.files=[absent.jsonl, 'shards/*.parquet']",
        "data.validation_files=[held.jsonl]",
    )
    with pytest.raises(SpecError) as caught:
        run_job(spec, tmp_path)
    messages = [(problem.key, problem.message) for problem in caught.value.problems]
    assert [key for key, _ in messages] == ["data.files", "data.files", "data.validation_files"]
    assert "absent.jsonl" in messages[0][1] and "shards/*.parquet" in messages[1][1]
    assert "correct the path" in caught.value.problems[0].fix
    assert not (tmp_path / "xcm-runs" / "mlflow.db").exists()


def test_a_pattern_that_walks_too_long_is_refused_in_one_line(tmp_path, monkeypatch):
    """A data pattern whose walk outlasts the limit (as /**/x does over a whole machine; here a tree of 3000
    directories against a limit of 1 ms) is refused naming its key and the fix, and no run starts; the other
    key's patterns are still checked."""
    from orchestrator.data import text_sources

    for index in range(3000):
        (tmp_path / "tree" / f"d{index // 100}" / f"e{index}").mkdir(parents=True)
    monkeypatch.setattr(text_sources, "PATTERN_WALK_LIMIT_S", 0.001)
    monkeypatch.chdir(tmp_path)
    spec = job(tmp_path, "data.source=files", "data.files=['tree/**/x.txt']", "data.validation_files=[held.jsonl]")
    with pytest.raises(SpecError) as caught:
        run_job(spec, tmp_path)
    (walk, missing) = caught.value.problems
    assert walk.key == "data.files" and "still walks the filesystem after 0.001 s" in walk.message
    assert "directory that holds the files" in walk.fix
    assert missing.key == "data.validation_files" and "held.jsonl" in missing.message
    assert not (tmp_path / "xcm-runs" / "mlflow.db").exists()


def test_text_field_not_in_the_file_names_the_columns(tmp_path):
    """A text_field the JSONL rows lack is reported with the columns they do have."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": "some text", "id": 1}] * 50)
    problems = problems_of(job(tmp_path, "data.source=files", f"data.files=[{corpus}]"))
    assert set(problems) == {"data.text_field"}
    assert "'text'" in problems["data.text_field"].message and "body, id" in problems["data.text_field"].message


def test_unreachable_hub_dataset_names_the_dataset_and_the_offline_fix(tmp_path):
    """Offline, a hub dataset not in the cache is an error naming it, its config, and local files as the fix."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by tests/conftest.py; this machine has no hub anyway
    problems = problems_of(
        job(tmp_path, "data.source=hub", "data.dataset=wikitext", "data.dataset_config=wikitext-2-raw-v1")
    )
    problem = problems["data.dataset"]
    assert "'wikitext'" in problem.message and "wikitext-2-raw-v1" in problem.message
    assert "source: files" in problem.fix and "offline" in problem.fix


def test_tokenizer_that_does_not_fit_the_model_or_does_not_load(tmp_path):
    """A tokenizer with more ids than the model's embedding, or one that does not load, is a data.tokenizer problem."""
    too_big = problems_of(job(tmp_path, "model.config={vocab_size: 100}"))["data.tokenizer"]
    assert "259 tokens" in too_big.message and "100" in too_big.message and ">= 259" in too_big.fix
    missing = problems_of(job(tmp_path, "data.tokenizer=no-such-org/no-such-tokenizer"))["data.tokenizer"]
    assert "no-such-org/no-such-tokenizer" in missing.message and "byte" in missing.fix


def test_validation_too_small_for_the_workers(tmp_path):
    """Evaluation needs a validation block per worker in every set; too few is reported before training."""
    problems = problems_of(job(tmp_path, "data.validation_examples=4", "evaluation.per_task=false"))
    assert "eval/loss holds 1 blocks" in problems["evaluation.every_steps"].message
    assert "fewer than the 2 workers" in problems["evaluation.every_steps"].message
    problems = problems_of(job(tmp_path, "data.validation_examples=2"))
    assert "fewer than one block" in problems["data.validation_examples"].message


@pytest.mark.parametrize(
    ("family", "source", "fix"),
    [
        ("mnist_mlp", "digits", "set data.validation_fraction > 0"),
        ("modular_addition", "modular_addition", "set data.validation_fraction > 0"),
        ("mnist_mlp", "mnist", "set data.validation_split to a split of the dataset (e.g. test)"),
    ],
)
def test_classifier_evaluation_with_nothing_held_out_is_refused_at_load(tmp_path, family, source, fix):
    """Evaluation of a classifier whose source holds nothing out names evaluation.every_steps and how to hold out."""
    with pytest.raises(SpecError) as caught:
        job(
            tmp_path,
            f"model.family={family}",
            f"data.source={source}",
            "data.validation_fraction=0",
            "data.validation_split=null",
            "evaluation.every_steps=5",
        )
    problem = {problem.key: problem for problem in caught.value.problems}["evaluation.every_steps"]
    assert "the data holds nothing out for validation" in problem.message
    assert fix in problem.fix and "evaluation.every_steps: 0" in problem.fix


def test_classifier_validation_smaller_than_the_workers_is_refused(tmp_path):
    """One held-out digit for two workers is reported by the data check, with the hold-out that would suffice."""
    problem = problems_of(
        job(
            tmp_path,
            "model.family=mnist_mlp",
            "data.source=digits",
            "data.validation_fraction=0.0006",
            "evaluation.every_steps=5",
        )
    )["evaluation.every_steps"]
    assert "eval/loss holds 1 examples, fewer than the 2 workers" in problem.message
    assert "raise data.validation_fraction until at least 2 examples are held out" in problem.fix


def test_spec_checks_catch_a_source_without_its_inputs_and_ignored_keys(tmp_path):
    """At spec load: files without a list, a key the source ignores, evaluation with nothing held out."""
    path = tmp_path / "job.yaml"
    path.write_text(
        "data:\n  source: files\n  dataset: wikitext\n  validation_fraction: 0\nevaluation:\n  every_steps: 10\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    keys = {problem.key: problem for problem in caught.value.problems}
    assert set(keys) == {"data.files", "data.dataset", "evaluation.every_steps"}
    assert keys["data.dataset"].line == 3 and "source: hub" in keys["data.dataset"].fix

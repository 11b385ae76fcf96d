"""Task sets for circuits: seeded find/judge halves, every source, and hostile task files refused in one line."""

import json
import os

import pytest
import torch
from torch import nn

from orchestrator.circuit_tasks import (
    IGNORE,
    MAX_TASK_FILE_BYTES,
    TaskContext,
    TaskError,
    answer_losses,
    build_task_set,
    check_task_specs,
    synthetic_prompt_answer,
)
from orchestrator.data.examples import LabelledExamples
from orchestrator.data.tokenizer import ByteTokenizer


def classifier_context(seed=0, eval_on_find_data=False, **overrides):
    labels = torch.arange(60) % 3  # 20 examples of each of 3 classes
    inputs = torch.arange(60, dtype=torch.float32)[:, None]  # an example's input names it
    return TaskContext(
        "classifier",
        base_dir=overrides.pop("base_dir", None) or os.getcwd(),
        labelled=LabelledExamples(inputs, labels),
        seed=seed,
        eval_on_find_data=eval_on_find_data,
        **overrides,
    )


def language_context(base_dir, **overrides):
    return TaskContext("language", base_dir=base_dir, tokenizer=ByteTokenizer(), max_positions=64, **overrides)


def ids(data) -> set[int]:
    return {int(value) for value in data.inputs[:, 0]}


def test_label_halves_are_disjoint_seeded_and_cover_the_class():
    """Each class's examples split into two disjoint halves whose union is the class; the same seed gives the same
    halves, another seed others; eval_on_find_data judges on the finding half."""
    tasks = build_task_set(["labels"], classifier_context(seed=1)).tasks
    assert [task.name for task in tasks] == ["label_0", "label_1", "label_2"]
    for task, label in zip(tasks, range(3), strict=True):
        assert ids(task.find).isdisjoint(ids(task.judge))
        assert ids(task.find) | ids(task.judge) == set(range(label, 60, 3))
        assert len(task.find) == len(task.judge) == 10 and (task.find.targets == label).all()
    again = build_task_set(["labels"], classifier_context(seed=1)).tasks
    other = build_task_set(["labels"], classifier_context(seed=2)).tasks
    assert ids(again[0].find) == ids(tasks[0].find) and ids(other[0].find) != ids(tasks[0].find)
    same = build_task_set(["labels"], classifier_context(eval_on_find_data=True)).tasks[0]
    assert same.find is same.judge and len(same.find) == 20


def test_label_groups_are_named_by_their_classes():
    """labels:0+2,1 makes two tasks, label_0_2 holding both classes and label_1."""
    tasks = build_task_set(["labels:0+2,1"], classifier_context()).tasks
    assert [task.name for task in tasks] == ["label_0_2", "label_1"]
    assert set(torch.cat([tasks[0].find.targets, tasks[0].judge.targets]).tolist()) == {0, 2}


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["labels:0+x"], r"joined by \+"),
        (["labels:7"], r"classes \[7\] have no examples"),
        (["labels", "labels"], r"named twice"),
        (["synthetic"], r"needs a language model"),
        (["bogus"], r"start it with one of"),
    ],
)
def test_bad_classifier_specs_are_one_line(specs, message):
    """Malformed groups, absent classes, duplicate names, a source of the wrong kind, an unknown source: one line."""
    with pytest.raises(TaskError, match=message) as error:
        build_task_set(specs, classifier_context())
    assert "\n" not in str(error.value)


def test_synthetic_tasks_label_only_the_answer_tokens(tmp_path):
    """Every synthetic task's labels decode to the text after its separator, and the prompt is unlabelled."""
    assert synthetic_prompt_answer("add: 23+58=81") == ("add: 23+58=", "81")
    assert synthetic_prompt_answer("reverse: abc|cba") == ("reverse: abc|", "cba")
    tasks = build_task_set(["synthetic:add,brackets"], language_context(tmp_path)).tasks
    assert [task.name for task in tasks] == ["add", "brackets"]
    tokenizer = ByteTokenizer()
    for task in tasks:
        for tokens, labels in zip(task.judge.inputs, task.judge.targets, strict=True):
            text = tokenizer.decode(tokens)
            answer = tokenizer.decode(labels[labels != IGNORE])
            assert text.startswith(f"{task.name}: ") and text.endswith(answer) and answer
            assert set(text[len(text) - len(answer) - 1]) <= {"=", "|"}


def test_answer_loss_is_aligned_with_the_next_token():
    """A model that predicts each next token exactly gets every answer right at ~0 loss; shifted by one, wrong."""

    class Oracle(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, tokens):
            following = torch.roll(tokens, -self.shift, dims=1)
            return 50.0 * nn.functional.one_hot(following, 259).float()

    data = build_task_set(["synthetic:add"], language_context(os.getcwd())).tasks[0].judge
    loss, right = answer_losses(Oracle(1), data.inputs, data.targets)
    assert right.all() and loss.max() < 1e-6
    loss, right = answer_losses(Oracle(2), data.inputs, data.targets)
    assert not right.any() and loss.min() > 1


def test_jsonl_and_text_files_become_tasks(tmp_path):
    """A JSONL file is one task named by its stem, labelled on the answer; a text file is a domain of blocks."""
    records = [{"prompt": f"Q{i}?", "answer": f"A{i}"} for i in range(10)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "chemistry.txt").write_text("benzene ring " * 40)
    tasks = build_task_set(["jsonl:qa.jsonl", "text:chemistry.txt"], language_context(tmp_path)).tasks
    assert [task.name for task in tasks] == ["qa", "chemistry"]
    qa, chemistry = tasks
    assert len(qa.find) + len(qa.judge) == 10
    answers = {ByteTokenizer().decode(labels[labels != IGNORE]) for labels in qa.judge.targets}
    assert answers <= {r["answer"] for r in records} and answers
    assert chemistry.find.inputs.shape[1] == 64 and len(chemistry.find) + len(chemistry.judge) == 520 // 64
    assert (chemistry.find.targets[:, 1:] == chemistry.find.inputs[:, 1:]).all()


def bad_file(tmp_path, name, content: bytes):
    (tmp_path / name).write_bytes(content)
    return name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jsonl:broken.jsonl", r"broken\.jsonl line 2: not JSON"),
        ("jsonl:keys.jsonl", r"line 1: expected exactly the keys prompt and answer"),
        ("jsonl:empty_answer.jsonl", r"non-empty strings"),
        ("jsonl:long.jsonl", r"exceed the model's context of 64"),
        ("text:latin1.txt", r"not UTF-8"),
        ("text:short.txt", r"at least 128 tokens"),
        ("jsonl:../outside.jsonl", r"resolves outside"),
        ("jsonl:link.jsonl", r"resolves outside"),
        ("jsonl:missing.jsonl", r"not a regular file"),
        ("jsonl:", r"needs a path"),
        ("text:big.txt", r"over the 16777216 limit"),
        ("jsonl:few.jsonl", r"needs at least 2"),
    ],
)
def test_hostile_task_files_are_refused_in_one_line(tmp_path, spec, message):
    """Broken JSON, wrong keys, empty or over-long answers, non-UTF-8, short text, escaping paths and links,
    missing and oversized files, a single example: each a TaskError of one line naming the file and the fix."""
    base = tmp_path / "tasks"
    base.mkdir()
    good = json.dumps({"prompt": "p", "answer": "a"})
    bad_file(base, "broken.jsonl", f"{good}\n{{nope\n".encode())
    bad_file(base, "keys.jsonl", b'{"prompt": "p", "answer": "a", "extra": 1}\n')
    bad_file(base, "empty_answer.jsonl", b'{"prompt": "p", "answer": ""}\n')
    bad_file(base, "long.jsonl", json.dumps({"prompt": "p" * 70, "answer": "a"}).encode())
    bad_file(base, "latin1.txt", "caf\xe9 ".encode("latin-1") * 100)
    bad_file(base, "short.txt", b"tiny")
    bad_file(base, "few.jsonl", good.encode())
    (tmp_path / "outside.jsonl").write_text(good)
    (base / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with open(base / "big.txt", "wb") as big:
        big.truncate(MAX_TASK_FILE_BYTES + 1)
    with pytest.raises(TaskError, match=message) as error:
        build_task_set([spec], language_context(base))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("specs", "kind", "message"),
    [
        (["synthetic:copy,nope"], "language", r"no task\(s\) \['nope'\]"),
        (["labels"], "language", r"needs a classifier model"),
        (["synthetic"], "classifier", r"needs a language model"),
        (["labels:0+1,2+3"], "classifier", r"classes \[3\] have no examples"),
        (["lables"], "classifier", r"start it with one of labels:"),
        (["labels:0,1", "labels:1+2,0"], "classifier", r"tasks \['label_0'\] are named twice"),
        (["synthetic:add", "synthetic:add,copy"], "language", r"tasks \['add'\] are named twice"),
        (["jsonl:a/qa.jsonl", "text:b/qa.txt"], "language", r"tasks \['qa'\] are named twice"),
        (["jsonl:missing.jsonl"], "language", r"not a regular file"),
        (["jsonl:../outside.jsonl"], "language", r"resolves outside"),
        (["text:"], "language", r"needs a path"),
        ([], "language", r"0 tasks: give between 1 and 64"),
    ],
)
def test_task_specs_are_checked_without_building_a_task(tmp_path, specs, kind, message):
    """What the specs alone tell is refused in one line before any example is built: an unknown source, class or
    synthetic task, a spec for the other kind of model, a task named twice, a task file outside the base
    directory or missing, no task at all."""
    base = tmp_path / "tasks"
    for name in ("a/qa.jsonl", "b/qa.txt"):
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("")
    (tmp_path / "outside.jsonl").write_text("")
    with pytest.raises(TaskError, match=message) as error:
        check_task_specs(specs, kind, classes=3, base_dir=base)
    assert "\n" not in str(error.value)


def test_task_specs_that_build_pass_the_check(tmp_path):
    """Specs that build_task_set builds pass the check, with and without the task files' directory at hand."""
    good = json.dumps({"prompt": "p", "answer": "a"})
    (tmp_path / "qa.jsonl").write_text(f"{good}\n{good}\n")
    language = ["synthetic:add,copy", "jsonl:qa.jsonl"]
    assert build_task_set(language, language_context(tmp_path)).names() == ["add", "copy", "qa"]
    check_task_specs(language, "language", classes=0, base_dir=tmp_path)
    check_task_specs(language, "language", classes=0)
    classifier = ["labels:0+1", "labels:2"]
    assert build_task_set(classifier, classifier_context()).names() == ["label_0_1", "label_2"]
    check_task_specs(classifier, "classifier", classes=3)

import re

import pytest

from orchestrator.data import TASKS, generate_examples, split_of, task_of


def _bodies(task, n=300, seed=0):
    return [example.text.removeprefix(f"{task}: ") for example in generate_examples(n, seed, (task,))]


def test_same_seed_same_examples_other_seed_differs():
    """Generation is a pure function of the seed."""
    assert generate_examples(50, seed=3) == generate_examples(50, seed=3)
    assert generate_examples(50, seed=3) != generate_examples(50, seed=4)


def test_every_task_appears_equally_and_texts_carry_their_tag():
    """Tasks are balanced, each text starts with its tag, and task_of reads the tag back."""
    examples = generate_examples(600, seed=0)
    counts = {task: sum(example.task == task for example in examples) for task in TASKS}
    assert counts == dict.fromkeys(TASKS, 100)
    for example in examples:
        assert example.text.startswith(f"{example.task}: ")
        assert task_of(example.text) == example.task
        assert 10 <= len(example.text) <= 60


def test_task_of_rejects_untagged_text():
    """A text without a known task tag raises instead of being mislabelled."""
    with pytest.raises(ValueError, match="task tag"):
        task_of("hello: world")


def test_addition_answers_are_correct():
    """Every `a+b=c` example has c == a + b."""
    for body in _bodies("add"):
        left, right, total = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", body).groups())
        assert left + right == total


def _balanced(brackets):
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def test_bracket_labels_are_correct_and_both_occur():
    """Each bracket string is labelled yes exactly when balanced, and both labels are common."""
    labels = []
    for body in _bodies("brackets"):
        brackets, label = body.split("=")
        assert label == ("yes" if _balanced(brackets) else "no")
        labels.append(label)
    assert 0.3 < labels.count("yes") / len(labels) < 0.7


def test_count_answers_are_correct():
    """Each `x in letters=n` example has n == occurrences of x in letters."""
    for body in _bodies("count"):
        letter, letters, count = re.fullmatch(r"(\w) in (\w+)=(\d+)", body).groups()
        assert letters.count(letter) == int(count)


def test_copy_reverse_sort_answers_are_correct():
    """The part after `|` is the copy, the reversal or the sorted letters of the part before."""
    transforms = {"copy": lambda s: s, "reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s))}
    for task, transform in transforms.items():
        for body in _bodies(task):
            letters, answer = body.split("|")
            assert answer == transform(letters)


def test_validation_split_never_shares_a_text_with_training():
    """Held-out examples are disjoint from training ones by content, whatever the seeds."""
    train = {example.text for example in generate_examples(3000, seed=0)}
    validation = {example.text for example in generate_examples(600, seed=0, split="validation")}
    assert train.isdisjoint(validation)
    assert {split_of(text) for text in validation} == {"validation"}


def test_bad_arguments_are_all_reported():
    """Unknown tasks, an unknown split and a negative count are reported in one error."""
    with pytest.raises(ValueError, match="num_examples=-1") as error:
        generate_examples(-1, seed=0, tasks=("copy", "poetry"), split="test")
    assert "num_examples=-1" in str(error.value)
    assert "poetry" in str(error.value)
    assert "split='test'" in str(error.value)

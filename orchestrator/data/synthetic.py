"""A synthetic multi-task text corpus, generated deterministically from a seed.

Each example is one short algorithmic task whose text starts with the task's name
(`add: 23+58=81`). The default job therefore runs offline, and an evaluator can later split any
text by task to ask whether clusters of the model specialise in one.
"""

import random
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TASKS = ("copy", "reverse", "sort", "count", "add", "brackets")
SPLITS = ("train", "validation")
TAG_SEPARATOR = ": "
VALIDATION_BUCKETS = 10  # one text in ten, chosen by a hash of its content, is held out


@dataclass(frozen=True)
class Example:
    """One tagged text, e.g. Example(task="add", text="add: 23+58=81")."""

    task: str
    text: str


def _letters(rng: random.Random, alphabet: str = string.ascii_lowercase, low: int = 3, high: int = 12) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _copy(rng: random.Random) -> str:
    letters = _letters(rng)
    return f"{letters}|{letters}"


def _reverse(rng: random.Random) -> str:
    letters = _letters(rng)
    return f"{letters}|{letters[::-1]}"


def _sort(rng: random.Random) -> str:
    letters = _letters(rng)
    return f"{letters}|{''.join(sorted(letters))}"


def _count(rng: random.Random) -> str:
    # A four-letter alphabet makes the counted letter recur, so answers are rarely zero.
    letters = _letters(rng, "abcd", 4, 16)
    letter = rng.choice("abcd")
    return f"{letter} in {letters}={letters.count(letter)}"


def _add(rng: random.Random) -> str:
    left, right = rng.randint(0, 99), rng.randint(0, 99)
    return f"{left}+{right}={left + right}"


def _balanced_brackets(rng: random.Random, pairs: int) -> str:
    text, opened, depth = [], 0, 0
    while len(text) < 2 * pairs:
        if opened < pairs and (depth == 0 or rng.random() < 0.5):
            text.append("(")
            opened, depth = opened + 1, depth + 1
        else:
            text.append(")")
            depth -= 1
    return "".join(text)


def _is_balanced(brackets: str) -> bool:
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _brackets(rng: random.Random) -> str:
    pairs = rng.randint(1, 8)
    # Half are built balanced, half are random (and so mostly unbalanced): both answers are common.
    if rng.random() < 0.5:
        brackets = _balanced_brackets(rng, pairs)
    else:
        brackets = "".join(rng.choice("()") for _ in range(2 * pairs))
    return f"{brackets}={'yes' if _is_balanced(brackets) else 'no'}"


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "add": _add,
    "brackets": _brackets,
}


def task_of(text: str) -> str:
    """Return the task named by the tag at the start of `text` (`"add: 1+2=3"` -> `"add"`)."""
    task, separator, _ = text.partition(TAG_SEPARATOR)
    if not separator or task not in TASKS:
        raise ValueError(f"text {text[:30]!r} does not start with a task tag; expected one of {TASKS}")
    return task


def split_of(text: str) -> str:
    """Return "validation" or "train" from a hash of the text, so the splits never share a text."""
    return "validation" if zlib.crc32(text.encode("utf-8")) % VALIDATION_BUCKETS == 0 else "train"


def _check_arguments(num_examples: int, tasks: Sequence[str], split: str) -> None:
    problems = []
    if num_examples < 0:
        problems.append(f"num_examples={num_examples} must be >= 0")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        problems.append(f"tasks={list(tasks)} must be a non-empty subset of {TASKS}")
    if split not in SPLITS:
        problems.append(f"split={split!r} must be one of {SPLITS}")
    if problems:
        raise ValueError("; ".join(problems))


def _draw(rng: random.Random, task: str, split: str) -> Example:
    while True:  # about 1 draw in 10 lands in validation, so this ends quickly for either split
        text = f"{task}{TAG_SEPARATOR}{_GENERATORS[task](rng)}"
        if split_of(text) == split:
            return Example(task, text)


def generate_examples(
    num_examples: int, seed: int, tasks: Sequence[str] = TASKS, split: str = "train"
) -> list[Example]:
    """Return `num_examples` tagged examples from `split`, the same ones for the same seed.

    Tasks take turns so each appears equally often (to within one); the order is then shuffled so
    packed blocks mix tasks.
    """
    tasks = tuple(tasks)
    _check_arguments(num_examples, tasks, split)
    rng = random.Random(seed)
    order = [tasks[index % len(tasks)] for index in range(num_examples)]
    rng.shuffle(order)
    return [_draw(rng, task, split) for task in order]

"""Task sets for circuits and specialization: named tasks, each with its examples split in two halves, one to
find a circuit and the other to judge it (a seeded split; `eval_on_find_data` judges on the finding half, as the
papers do).

Sources, each named by a short spec (the `--tasks` of `xcm circuits`, the `circuits.tasks` of a job):

- ``labels`` / ``labels:0+1+2,3+4``: a classifier's classes (or groups of them) on its own data: images, or
  modular addition, whose tasks are its answer values (``answer_5``);
- ``synthetic`` / ``synthetic:copy,add``: the synthetic corpus's tagged tasks, scored by the cross-entropy of
  the answer tokens after the prompt (teacher-forced);
- ``jsonl:FILE``: one task of {"prompt", "answer"} records, scored like the synthetic tasks;
- ``text:FILE``: one domain of plain text (e.g. chemistry vs general text), scored by the LM loss of its blocks.

Task files are hostile input: they must resolve (symlinks followed) to a regular file inside the base directory,
their size, records and tokens are bounded, and every problem is one `TaskError` line naming the fix.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from orchestrator.spec import CIRCUIT_TASK_FORMS

if TYPE_CHECKING:
    from orchestrator.data.examples import LabelledExamples
    from orchestrator.data.tokenizer import TextTokenizer

IGNORE = -100  # a label position that no loss counts (PyTorch's and transformers' convention)
MAX_TASKS = 64
MAX_TASK_FILE_BYTES = 16 << 20
MAX_EXAMPLES = 2000  # per task, before the split: the first ones of a file, a class's first ones
SYNTHETIC_EXAMPLES = 200  # per synthetic task
TEXT_BLOCK = 64  # tokens per block of a text domain (at most the model's context)
SOURCES = ("labels", "synthetic", "jsonl", "text")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
Kind = Literal["classifier", "language"]


class TaskError(ValueError):
    """A task spec or task file xcm cannot use: the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class TaskData:
    """Classifier inputs `[n, ...]` with classes `[n]`, or tokens `[n, T]` with labels `[n, T]` (the token
    where the position's loss counts, `IGNORE` elsewhere; position t is predicted from positions < t)."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, size: int) -> list[tuple[Tensor, Tensor]]:
        return [(self.inputs[i : i + size], self.targets[i : i + size]) for i in range(0, len(self), size)]


@dataclass(frozen=True)
class Task:
    name: str
    find: TaskData  # the half that chooses the circuit
    judge: TaskData  # the half that scores it (the same examples under eval_on_find_data)


@dataclass(frozen=True)
class TaskSet:
    kind: Kind
    tasks: tuple[Task, ...]

    def names(self) -> list[str]:
        return [task.name for task in self.tasks]


@dataclass(frozen=True)
class TaskContext:
    """What the sources need: the model's own data (classifiers), its tokenizer and context (language models)."""

    kind: Kind
    base_dir: Path  # task files must lie inside it
    labelled: LabelledExamples | None = None  # a classifier's examples, held-out ones first choice
    label_prefix: str = "label"  # "answer" for modular addition
    tokenizer: TextTokenizer | None = None
    max_positions: int = 1024
    seed: int = 0
    eval_on_find_data: bool = False
    max_examples: int = MAX_EXAMPLES


def build_task_set(specs: Sequence[str], context: TaskContext) -> TaskSet:
    """The tasks of every spec, in order; names unique, at most `MAX_TASKS`, all of the model's kind."""
    tasks = [task for spec in specs for task in _tasks_of(spec.strip(), context)]
    _check_names([task.name for task in tasks])
    return TaskSet(context.kind, tuple(tasks))


def check_task_specs(specs: Sequence[str], kind: Kind, classes: int, base_dir: Path | None = None) -> None:
    """Refuse what `build_task_set` would refuse in the specs themselves, without building any task: a source
    unknown or not for a model of `kind`, a class or synthetic task that does not exist (a classifier has
    classes 0..`classes`-1), a task named twice, too many; and, when `base_dir` is given, a task file not
    under it. What only the files' contents tell (their records, their tokens) is left to the build."""
    names = []
    for spec in specs:
        source, argument = _source_of(spec.strip(), kind)
        names += _task_names(source, argument, classes, base_dir)
    _check_names(names)


def _source_of(spec: str, kind: Kind) -> tuple[str, str]:
    """A spec's source and argument, refused when the source is unknown or needs the other kind of model."""
    source, _, argument = spec.partition(":")
    if source not in SOURCES:
        raise TaskError(
            f"task spec {spec!r}: start it with one of {', '.join(s + ':' for s in SOURCES)} ({CIRCUIT_TASK_FORMS})"
        )
    needed: Kind = "classifier" if source == "labels" else "language"
    if kind != needed:
        raise TaskError(
            f"task spec {spec!r} needs a {needed} model, and this one is a {kind}; "
            f"use {'labels' if kind == 'classifier' else 'synthetic, jsonl:FILE or text:FILE'}"
        )
    return source, argument


def _tasks_of(spec: str, context: TaskContext) -> list[Task]:
    source, argument = _source_of(spec, context.kind)
    builders = {"labels": label_tasks, "synthetic": synthetic_tasks, "jsonl": jsonl_tasks, "text": text_tasks}
    return builders[source](argument, context)


def _task_names(source: str, argument: str, classes: int, base_dir: Path | None) -> list[str]:
    """The names a spec's tasks will have (labels under the generic prefix, which is enough to find twins)."""
    if source == "labels":
        present = list(range(classes))
        return [_label_name("label", group) for group in _label_groups(argument, present)]
    if source == "synthetic":
        return _synthetic_names(argument)
    if base_dir is None:
        _require_path(argument)
        return [_task_name(Path(argument))]
    return [_task_name(task_file(argument, base_dir))]


def _check_names(names: Sequence[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TaskError(
            f"tasks {duplicates} are named twice; name each class, group and synthetic task once, and give "
            "task files different names"
        )
    if not names or len(names) > MAX_TASKS:
        raise TaskError(f"{len(names)} tasks: give between 1 and {MAX_TASKS} (fewer label groups or files)")


def split_task(name: str, data: TaskData, context: TaskContext) -> Task:
    """Seeded halves (by the seed and the task's name, so adding a task leaves the others' halves as they were);
    the judging half takes the odd example."""
    minimum = 1 if context.eval_on_find_data else 2
    if len(data) < minimum:
        raise TaskError(
            f"task {name!r} has {len(data)} example(s); it needs at least {minimum} "
            "(one to find its circuit, one to judge it)"
        )
    if context.eval_on_find_data:
        return Task(name, data, data)
    seed = context.seed + zlib.crc32(name.encode())
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    half = len(data) // 2
    find, judge = order[:half], order[half:]
    return Task(
        name, TaskData(data.inputs[find], data.targets[find]), TaskData(data.inputs[judge], data.targets[judge])
    )


# ---- classifiers ----------------------------------------------------------------------------------------------


def label_tasks(argument: str, context: TaskContext) -> list[Task]:
    """One task per class present in the data, or per group of classes (``0+1+2,3+4``, named ``label_0_1_2``)."""
    labelled = context.labelled
    if labelled is None:
        raise TaskError("labels: this model has no labelled data here; pass --tasks for its kind of data")
    present = sorted(int(label) for label in labelled.labels.unique())
    tasks = []
    for group in _label_groups(argument, present):
        rows = torch.nonzero(torch.isin(labelled.labels, torch.tensor(group)), as_tuple=True)[0][: context.max_examples]
        name = _label_name(context.label_prefix, group)
        tasks.append(split_task(name, TaskData(labelled.inputs[rows], labelled.labels[rows]), context))
    return tasks


def _label_name(prefix: str, group: Sequence[int]) -> str:
    return f"{prefix}_{'_'.join(map(str, group))}"


def _label_groups(argument: str, present: list[int]) -> list[list[int]]:
    """Each class present on its own, or the groups `argument` names (every class in them present)."""
    if not argument:
        return [[label] for label in present]
    groups = []
    for part in argument.split(","):
        if not re.fullmatch(r"\d{1,6}(\+\d{1,6})*", part.strip()):
            raise TaskError(
                f"labels:{argument}: groups are classes joined by + and separated by commas, e.g. labels:0+1+2,3+4"
            )
        groups.append([int(value) for value in part.strip().split("+")])
    missing = sorted({label for group in groups for label in group} - set(present))
    if missing:
        raise TaskError(f"labels:{argument}: classes {missing} have no examples (the data has {present})")
    return groups


# ---- language models ------------------------------------------------------------------------------------------


def synthetic_tasks(argument: str, context: TaskContext) -> list[Task]:
    """The corpus's held-out texts of each task, prompt = the text up to its answer separator."""
    from orchestrator.data.synthetic import generate_examples

    count = min(SYNTHETIC_EXAMPLES, context.max_examples)
    tasks = []
    for name in _synthetic_names(argument):
        examples = generate_examples(count, context.seed, [name], split="validation")
        pairs = [synthetic_prompt_answer(example.text) for example in examples]
        tasks.append(split_task(name, _answer_data(pairs, context, f"synthetic task {name}"), context))
    return tasks


def _synthetic_names(argument: str) -> list[str]:
    """The corpus's tasks `argument` names (every one when empty), each a task the corpus has."""
    from orchestrator.data.synthetic import TASKS

    names = [name.strip() for name in argument.split(",")] if argument else list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise TaskError(f"synthetic:{argument}: no task(s) {unknown}; choose from {', '.join(TASKS)}")
    return names


def synthetic_prompt_answer(text: str) -> tuple[str, str]:
    """`"add: 23+58=81"` -> (`"add: 23+58="`, `"81"`): the answer follows the text's last `|` or `=`."""
    cut = max(text.rfind("|"), text.rfind("=")) + 1
    return text[:cut], text[cut:]


def jsonl_tasks(argument: str, context: TaskContext) -> list[Task]:
    """One task named by the file's stem, from its first `max_examples` {"prompt": ..., "answer": ...} lines."""
    path = task_file(argument, context.base_dir)
    pairs = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if len(pairs) == context.max_examples:
            break
        pairs.append(_prompt_answer(line, path, number))
    return [split_task(_task_name(path), _answer_data(pairs, context, str(path)), context)]


def _prompt_answer(line: str, path: Path, number: int) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskError(
            f"{path} line {number}: not JSON ({error.msg}); write one "
            '{"prompt": "...", "answer": "..."} object per line'
        ) from None
    if not isinstance(record, dict) or set(record) != {"prompt", "answer"}:
        raise TaskError(
            f"{path} line {number}: expected exactly the keys prompt and answer, got "
            f"{sorted(record) if isinstance(record, dict) else type(record).__name__}"
        )
    if not all(isinstance(record[key], str) and record[key] for key in ("prompt", "answer")):
        raise TaskError(f"{path} line {number}: prompt and answer must be non-empty strings")
    return record["prompt"], record["answer"]


def text_tasks(argument: str, context: TaskContext) -> list[Task]:
    """One domain named by the file's stem: its tokens cut into blocks, every next-token prediction counted."""
    path = task_file(argument, context.base_dir)
    tokenizer = _tokenizer(context)
    block = min(TEXT_BLOCK, context.max_positions)
    tokens = torch.tensor(tokenizer.encode(_read_text(path)), dtype=torch.long)
    blocks = tokens[: len(tokens) // block * block].reshape(-1, block)[: context.max_examples]  # [n, block]
    if len(blocks) < 2:
        raise TaskError(
            f"{path}: {len(tokens)} tokens make {len(blocks)} block(s) of {block}; a domain needs "
            f"at least {2 * block} tokens"
        )
    labels = blocks.clone()
    labels[:, 0] = IGNORE  # nothing before it to predict it from
    return [split_task(_task_name(path), TaskData(blocks, labels), context)]


def _answer_data(pairs: Sequence[tuple[str, str]], context: TaskContext, where: str) -> TaskData:
    """Token rows `[eos, prompt..., answer...]`, right-padded; only the answer positions are labelled. The eos
    stands where training's packing puts one: before every document."""
    tokenizer = _tokenizer(context)
    rows, labels = [], []
    for prompt, answer in pairs:
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
        if not answer_ids:
            raise TaskError(f"{where}: the answer {answer[:40]!r} encodes to no tokens; give a non-empty answer")
        row = [tokenizer.eos_id, *prompt_ids, *answer_ids]
        if len(row) > context.max_positions:
            raise TaskError(
                f"{where}: a prompt and answer of {len(row)} tokens exceed the model's context of "
                f"{context.max_positions}; shorten it"
            )
        rows.append(row)
        labels.append([IGNORE] * (1 + len(prompt_ids)) + answer_ids)
    width = max(len(row) for row in rows) if rows else 1
    pad = tokenizer.eos_id
    tokens = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long).reshape(-1, width)
    targets = torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels], dtype=torch.long)
    return TaskData(tokens, targets.reshape(-1, width))


def _tokenizer(context: TaskContext) -> TextTokenizer:
    if context.tokenizer is None:
        raise TaskError(
            "this model has no tokenizer here (a directory without tokenizer files, trained on a "
            "vocabulary xcm cannot tell); export it from its xcm checkpoint, or give the checkpoint"
        )
    return context.tokenizer


def task_file(argument: str, base_dir: Path) -> Path:
    """`argument` as a regular file inside `base_dir` (relative paths from it; symlinks followed first)."""
    _require_path(argument)
    base = base_dir.resolve()
    path = (base / argument).resolve()
    if not path.is_relative_to(base):
        raise TaskError(f"task file {argument!r} resolves outside {base}; put task files under that directory")
    if not path.is_file():
        raise TaskError(f"task file {argument!r} is not a regular file under {base}")
    return path


def _require_path(argument: str) -> None:
    if not argument:
        raise TaskError("a task file spec needs a path: jsonl:FILE or text:FILE")


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_TASK_FILE_BYTES:
        raise TaskError(
            f"task file {path} is {size} bytes, over the {MAX_TASK_FILE_BYTES} limit; split it or keep a sample"
        )
    with path.open("rb") as handle:
        data = handle.read(MAX_TASK_FILE_BYTES + 1)
    try:
        return data[:MAX_TASK_FILE_BYTES].decode("utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"task file {path} is not UTF-8 text (byte {error.start}); convert it to UTF-8") from None


def _task_name(path: Path) -> str:
    name = path.name.split(".")[0]
    if not _TASK_NAME.fullmatch(name):
        raise TaskError(
            f"task file {path.name!r}: its name (before the first dot) names the task, and must be "
            "letters, digits, _ . - (at most 64); rename the file"
        )
    return name


# ---- metrics --------------------------------------------------------------------------------------------------


def logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's logits, whether it returns them or a transformers output holding them."""
    output = model(inputs)
    return output.logits if hasattr(output, "logits") else output


def answer_losses(model: nn.Module, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: mean cross-entropy (float64) over its labelled positions, and whether every labelled token
    is the model's top prediction (teacher-forced)."""
    logits = logits_of(model, tokens)[:, :-1].double()  # [B, T-1, V]: position t predicts token t + 1
    targets = labels[:, 1:].to(logits.device)  # [B, T-1]
    counted = targets != IGNORE
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    per_example = (losses * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1)
    right = ((logits.argmax(dim=-1) == targets) | ~counted).all(dim=1)
    return per_example, right


def language_examples(model: nn.Module, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example score (−answer loss, higher is better) and correctness: the ablation's evaluate."""
    loss, right = answer_losses(model, tokens, labels)
    return -loss, right


def language_metric(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean answer loss over the batch's labelled tokens: attribution's metric on language tasks."""
    tokens, labels = batch
    logits = logits_of(model, tokens)[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:].to(logits.device), ignore_index=IGNORE)


def classifier_metric(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of the batch's classes: attribution's metric on classifier tasks."""
    inputs, targets = batch
    logits = logits_of(model, inputs)
    return nn.functional.cross_entropy(logits, targets.long().to(logits.device))

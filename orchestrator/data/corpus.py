"""Ready-to-train tensors from the synthetic corpus: training, validation and per-task blocks."""

from collections.abc import Sequence

import torch

from orchestrator.data.packing import pack_texts
from orchestrator.data.synthetic import TASKS, generate_examples
from orchestrator.data.tokenizer import ByteTokenizer, TextTokenizer


def _split_blocks(
    num_examples: int,
    block_size: int,
    seed: int,
    tasks: Sequence[str] | None,
    split: str,
    tokenizer: TextTokenizer | None,
) -> tuple[torch.Tensor, TextTokenizer]:
    tokenizer = tokenizer or ByteTokenizer()
    examples = generate_examples(num_examples, seed, TASKS if tasks is None else tasks, split)
    return pack_texts([example.text for example in examples], block_size, tokenizer), tokenizer


def build_synthetic_blocks(
    num_examples: int,
    block_size: int,
    seed: int,
    tasks: Sequence[str] | None = None,
    tokenizer: TextTokenizer | None = None,
) -> tuple[torch.Tensor, TextTokenizer]:
    """Return training blocks [n_blocks, block_size + 1] of mixed tasks, and their tokenizer (bytes by default)."""
    return _split_blocks(num_examples, block_size, seed, tasks, "train", tokenizer)


def build_validation_blocks(
    num_examples: int,
    block_size: int,
    seed: int,
    tasks: Sequence[str] | None = None,
    tokenizer: TextTokenizer | None = None,
) -> tuple[torch.Tensor, TextTokenizer]:
    """Return held-out blocks [n_blocks, block_size + 1]: no text in them occurs in training."""
    return _split_blocks(num_examples, block_size, seed, tasks, "validation", tokenizer)


def task_blocks(
    num_examples_per_task: int,
    block_size: int,
    seed: int,
    tasks: Sequence[str] | None = None,
    split: str = "validation",
    tokenizer: TextTokenizer | None = None,
) -> dict[str, torch.Tensor]:
    """Return {task: blocks [n_blocks, block_size + 1]}, each task packed alone.

    Separate tensors per task let an evaluator measure loss task by task, e.g. to ask which
    model cluster a task depends on.
    """
    tokenizer = tokenizer or ByteTokenizer()
    blocks = {}
    for task in TASKS if tasks is None else tasks:
        examples = generate_examples(num_examples_per_task, seed, (task,), split)
        blocks[task] = pack_texts([example.text for example in examples], block_size, tokenizer)
    return blocks

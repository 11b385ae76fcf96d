"""The contract between a data source and the trainer: what every source builder returns, or raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orchestrator.data.tokenizer import TextTokenizer


@dataclass(frozen=True)
class TrainingData:
    """Packed token blocks to train and evaluate on, and the tokenizer that made them.

    Blocks are [n_blocks, block_size + 1] (inputs and next-token labels in one row, see
    ``split_inputs_and_labels``); a worker streams its own shard of ``train`` with ``batch_stream``, which
    addresses batches by step, so a resumed run continues with the next unseen batch.
    """

    train: torch.Tensor  # [n_blocks, block_size + 1]
    validation: torch.Tensor | None  # [n_validation_blocks, block_size + 1]; None when nothing is held out
    tokenizer: TextTokenizer
    validation_by_task: dict[str, torch.Tensor] = field(default_factory=dict)  # synthetic corpus: task -> blocks
    cache_hit: bool = False  # True when the blocks were read from the token cache rather than tokenized now

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def evaluation_sets(data, per_task: bool) -> dict:
    """Loss metric name -> items of `data` (``TrainingData`` blocks [n, block_size + 1], or ``ExampleData``'s
    labelled examples): the validation split, and each synthetic task's when ``per_task``."""
    from orchestrator import metric_names

    sets = {} if data.validation is None else {metric_names.EVAL_LOSS: data.validation}
    if per_task:
        sets.update({metric_names.eval_task_loss(task): items for task, items in data.validation_by_task.items()})
    return sets


class DataError(ValueError):
    """Input a source cannot use (a missing file, an unreachable dataset, a wrong column), with its fix.

    Carries the spec key to change, so the driver can report it like any other job-spec problem.
    """

    def __init__(self, key: str, message: str, fix: str):
        self.key, self.message, self.fix = key, message, fix
        super().__init__(f"{key}: {message}. Fix: {fix}")

"""Data: a synthetic multi-task corpus, byte tokens, packed blocks, per-rank resumable batch streams."""
from orchestrator.data.corpus import build_synthetic_blocks, build_validation_blocks, task_blocks
from orchestrator.data.loader import ShardedBatches, batch_stream
from orchestrator.data.packing import pack_texts, split_inputs_and_labels
from orchestrator.data.synthetic import TASKS, Example, generate_examples, split_of, task_of
from orchestrator.data.tokenizer import ByteTokenizer

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "Example",
    "ShardedBatches",
    "batch_stream",
    "build_synthetic_blocks",
    "build_validation_blocks",
    "generate_examples",
    "pack_texts",
    "split_inputs_and_labels",
    "split_of",
    "task_blocks",
    "task_of",
]

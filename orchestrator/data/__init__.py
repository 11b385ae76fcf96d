"""Data: sources (synthetic corpus, hub datasets, local files) -> tokenized, packed, cached blocks -> per-rank
resumable batch streams. ``build_training_data`` is the one entry point the trainer uses."""

from orchestrator.data.corpus import build_synthetic_blocks, build_validation_blocks, task_blocks
from orchestrator.data.loader import ShardedBatches, batch_stream
from orchestrator.data.packing import pack_texts, split_inputs_and_labels
from orchestrator.data.sources import BUILDERS, build_training_data
from orchestrator.data.synthetic import TASKS, Example, generate_examples, split_of, task_of
from orchestrator.data.tokenizer import ByteTokenizer, PretrainedTokenizer, TextTokenizer, load_tokenizer
from orchestrator.data.training_data import DataError, TrainingData

__all__ = [
    "BUILDERS",
    "TASKS",
    "ByteTokenizer",
    "DataError",
    "Example",
    "PretrainedTokenizer",
    "ShardedBatches",
    "TextTokenizer",
    "TrainingData",
    "batch_stream",
    "build_synthetic_blocks",
    "build_training_data",
    "build_validation_blocks",
    "generate_examples",
    "load_tokenizer",
    "pack_texts",
    "split_inputs_and_labels",
    "split_of",
    "task_blocks",
    "task_of",
]

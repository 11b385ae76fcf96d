"""One rank of the two-process evaluation test (run as a script: ``rank world_size init_file result_file``).

A separate process rather than a fork: the pytest process may hold Ray's threads by the time this test runs.
Each rank evaluates a token set and a labelled-example set; rank 0 also computes the references from one
forward over every item in one process, and writes both outcomes.
"""

import json
import sys
from types import SimpleNamespace

import torch

from orchestrator import metric_names
from orchestrator.data.examples import LabelledExamples
from orchestrator.spec import EvaluationSpec
from orchestrator.train.evaluation import Evaluator
from orchestrator.train.objectives import CausalLanguageModelling, Classification

VOCAB = 64
CLASSES = 3


class TinyLanguageModel(torch.nn.Module):
    """Embedding and head, called like a transformers causal LM: ``model(input_ids=...).logits``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))  # [B, T, vocab]


class TinyClassifier(torch.nn.Module):
    """Called like xcm's classifiers: ``model(inputs=...)`` returns logits [B, classes]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, CLASSES)

    def forward(self, inputs):
        return self.linear(inputs.flatten(1))


def uneven_examples(model: TinyClassifier) -> LabelledExamples:
    """14 examples whose strided rank shards differ in accuracy (rank 0: 7 of 7 right; rank 1: 1 of 7, all in its
    second, smaller micro-batch), so only the exact, example-weighted all-reduce gives 8/14."""
    inputs = torch.randn(14, 1, 4, 4, generator=torch.Generator().manual_seed(2))  # [n, C, H, W]
    with torch.no_grad():
        predicted = model(inputs).argmax(-1)  # [n]
    right = torch.arange(14) % 2 == 0
    right[13] = True
    return LabelledExamples(inputs, torch.where(right, predicted, (predicted + 1) % CLASSES))


def evaluate(model, objective, items, rank: int, world_size: int) -> dict[str, float]:
    evaluator = Evaluator(
        model,
        objective,
        {metric_names.EVAL_LOSS: items},
        EvaluationSpec(every_steps=1),
        micro_batch_size=4,
        rank=rank,
        world_size=world_size,
        last_step=9,
        device=torch.device("cpu"),
    )
    return evaluator.evaluate()


def main(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    language_model, classifier = TinyLanguageModel(), TinyClassifier()
    blocks = torch.randint(0, VOCAB, (12, 17), generator=torch.Generator().manual_seed(1))  # [n, block_size + 1]
    examples = uneven_examples(classifier)
    language = evaluate(language_model, CausalLanguageModelling(), blocks, rank, world_size)
    classification = evaluate(classifier, Classification(torch.float32), examples, rank, world_size)
    if rank == 0:
        with torch.no_grad():
            token_logits = language_model(input_ids=blocks[:, :-1]).logits  # [n, T, vocab]
            class_logits = classifier(examples.inputs)  # [n, classes]
        references = {
            "token_loss": torch.nn.functional.cross_entropy(token_logits.flatten(0, 1), blocks[:, 1:].flatten()).item(),
            "example_loss": torch.nn.functional.cross_entropy(class_logits, examples.labels).item(),
            "accuracy": (class_logits.argmax(-1) == examples.labels).float().mean().item(),
        }
        with open(result_file, "w") as handle:
            json.dump({"language": language, "classification": classification, "references": references}, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

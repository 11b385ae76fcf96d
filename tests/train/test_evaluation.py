"""Eval loss (and perplexity or accuracy) over the validation split: each rank evaluates its share, and the
all-reduced means are exact."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import metric_names
from orchestrator.data import ByteTokenizer, TrainingData
from orchestrator.data.examples import LabelledExamples
from orchestrator.data.training_data import evaluation_sets
from orchestrator.spec import EvaluationSpec
from orchestrator.train.evaluation import Evaluator
from orchestrator.train.objectives import CausalLanguageModelling, Classification
from tests.helpers import tiny_gpt2

LANGUAGE = CausalLanguageModelling()
VOCAB = 64


def tiny_model():
    return tiny_gpt2(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)


def validation_blocks(n_blocks=12, width=17):
    return torch.randint(0, VOCAB, (n_blocks, width), generator=torch.Generator().manual_seed(1))


def mean_token_loss(model, blocks):
    """The reference: one forward over all blocks in one process."""
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """What two gloo ranks (evaluate_on_rank.py) report for a token set and an example set, with the references."""
    directory = tmp_path_factory.mktemp("two-ranks")
    script, result = Path(__file__).with_name("evaluate_on_rank.py"), directory / "metrics.json"
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", str(directory / "init"), str(result)])
        for rank in range(2)
    ]
    assert [process.wait(timeout=180) for process in ranks] == [0, 0]
    return json.loads(result.read_text())


def test_two_ranks_give_the_single_process_loss_and_perplexity(two_ranks):
    """Two gloo ranks, each over its half in micro-batches, all-reduce to the one-process mean token loss."""
    metrics, expected = two_ranks["language"], two_ranks["references"]["token_loss"]
    assert metrics[metric_names.EVAL_LOSS] == pytest.approx(expected, rel=1e-6)
    assert metrics[metric_names.EVAL_PERPLEXITY] == pytest.approx(math.exp(expected), rel=1e-6)


def test_two_ranks_give_the_single_process_accuracy(two_ranks):
    """Ranks whose halves differ in accuracy (7/7 and 1/7, over micro-batches of 4 and 3) all-reduce to the
    one-process accuracy 8/14 and mean example loss: example-weighted, not a mean of rank or batch means."""
    metrics, references = two_ranks["classification"], two_ranks["references"]
    assert references["accuracy"] == pytest.approx(8 / 14)
    assert metrics[metric_names.EVAL_ACCURACY] == pytest.approx(references["accuracy"], rel=1e-6)
    assert metrics[metric_names.EVAL_LOSS] == pytest.approx(references["example_loss"], rel=1e-6)
    assert metric_names.EVAL_PERPLEXITY not in metrics


def test_max_batches_evaluates_the_same_first_blocks_and_restores_training_mode():
    """With max_batches the evaluator reads a fixed first part of the shard, and leaves the model as it found it."""
    model, blocks = tiny_model().train(), validation_blocks()
    evaluator = Evaluator(
        model,
        LANGUAGE,
        {metric_names.EVAL_LOSS: blocks},
        EvaluationSpec(every_steps=1, max_batches=2),
        micro_batch_size=3,
        rank=0,
        world_size=1,
        last_step=9,
        device=torch.device("cpu"),
    )
    loss = evaluator.evaluate()[metric_names.EVAL_LOSS]
    assert loss == pytest.approx(mean_token_loss(model, blocks[:6]), rel=1e-5)
    assert model.training


class PixelClassifier(torch.nn.Module):
    """The calling convention of xcm's classifiers: ``model(inputs=...)`` returns logits [B, classes]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, 3)

    def forward(self, inputs):
        return self.linear(inputs.flatten(1))


def test_classifiers_get_eval_loss_and_accuracy_without_perplexity():
    """For labelled examples the evaluator reports the example-weighted loss and accuracy, and no perplexity."""
    generator = torch.Generator().manual_seed(2)
    examples = LabelledExamples(
        torch.randn(10, 1, 4, 4, generator=generator), torch.randint(0, 3, (10,), generator=generator)
    )
    model = PixelClassifier()
    evaluator = Evaluator(
        model,
        Classification(torch.float32),
        {metric_names.EVAL_LOSS: examples},
        EvaluationSpec(every_steps=1),
        micro_batch_size=4,
        rank=0,
        world_size=1,
        last_step=9,
        device=torch.device("cpu"),
    )
    metrics = evaluator.evaluate()
    with torch.no_grad():
        logits = model(examples.inputs)
    assert set(metrics) == {metric_names.EVAL_LOSS, metric_names.EVAL_ACCURACY}
    assert metrics[metric_names.EVAL_LOSS] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, examples.labels).item()
    )
    assert metrics[metric_names.EVAL_ACCURACY] == pytest.approx(
        (logits.argmax(-1) == examples.labels).float().mean().item()
    )


def test_due_every_n_steps_and_after_the_last():
    """Evaluation falls after every every_steps-th step and after the last; every_steps 0 turns it off."""

    def due_steps(every):
        evaluator = Evaluator(
            torch.nn.Identity(),
            LANGUAGE,
            {metric_names.EVAL_LOSS: validation_blocks()},
            EvaluationSpec(every_steps=every),
            micro_batch_size=4,
            rank=0,
            world_size=1,
            last_step=11,
            device=torch.device("cpu"),
        )
        return [step for step in range(12) if evaluator.due(step)]

    assert due_steps(5) == [4, 9, 11]
    assert due_steps(0) == []


def test_sets_name_the_split_and_each_task():
    """eval/loss covers the validation split and eval/loss/<task> each task; per_task: false keeps only the split."""
    blocks = validation_blocks()
    data = TrainingData(
        train=blocks,
        validation=blocks,
        tokenizer=ByteTokenizer(),
        validation_by_task={"add": blocks[:4], "copy": blocks[4:]},
    )
    assert set(evaluation_sets(data, per_task=True)) == {"eval/loss", "eval/loss/add", "eval/loss/copy"}
    assert set(evaluation_sets(data, per_task=False)) == {"eval/loss"}

"""Objectives: which one a job gets, the task loss and metrics of a micro-batch, and what throughput counts."""

import pytest
import torch

from orchestrator import metric_names
from orchestrator.models import build_model
from orchestrator.spec import ModelSpec
from orchestrator.train.job_checks import load_spec
from orchestrator.train.objectives import CausalLanguageModelling, Classification, objective_for
from tests.helpers import ROOT, tiny_spec


def test_text_sources_predict_tokens_and_the_others_classes():
    """Text data gets next-token prediction counted in tokens; images and modular addition get classification."""
    assert isinstance(objective_for(tiny_spec()), CausalLanguageModelling)
    spec = load_spec(ROOT / "jobs" / "modular_addition.yaml")
    assert isinstance(objective_for(spec), Classification) and objective_for(spec).unit == "samples"


def test_causal_lm_loss_is_the_mean_next_token_cross_entropy():
    """The LM loss equals cross-entropy of the logits against the shifted labels, averaged over B·T tokens."""
    model = build_model(ModelSpec(), vocab_size=259, seed=0)
    blocks = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}
    loss, metrics = CausalLanguageModelling().loss(model, batch)
    logits = model(input_ids=blocks[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert loss.item() == pytest.approx(expected.item())
    assert metrics == {} and CausalLanguageModelling().count(batch) == 16


class Fixed(torch.nn.Module):
    """Returns preset logits whatever the input, recording the input's dtype."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)
        self.seen_dtype = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen_dtype = inputs.dtype
        return self.logits


def test_classification_reports_accuracy_and_casts_pixels_to_the_compute_precision():
    """Accuracy is the share of argmax hits; float pixels reach the model in bf16 under bf16, token ids stay integer."""
    model = Fixed(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]]))
    batch = {"inputs": torch.zeros(4, 1, 2, 2), "labels": torch.tensor([0, 1, 1, 1])}
    loss, metrics = Classification(torch.bfloat16).loss(model, batch)
    assert metrics[metric_names.ACCURACY].item() == 0.5 and model.seen_dtype == torch.bfloat16
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(model.logits, batch["labels"]).item())
    Classification(torch.bfloat16).loss(
        model, {"inputs": torch.zeros(4, 3, dtype=torch.long), "labels": batch["labels"]}
    )
    assert model.seen_dtype == torch.long

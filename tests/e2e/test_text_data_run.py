"""A whole job on local text: JSONL files and a local tokenizer -> cached blocks -> ZeRO-3 workers -> eval in MLflow."""

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.train.job_checks import load_spec
from orchestrator.train.launch import run_job

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVAL_EVERY = 8, 4


def save_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer with an <eos> token, saved as a user's local tokenizer would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)


@pytest.mark.slow
def test_jsonl_files_train_under_zero3_with_eval_loss_and_perplexity(tmp_path, local_ray):
    """Local JSONL + a named tokenizer train under ZeRO-3; rank 0 logs eval/loss and eval/perplexity every N steps."""
    documents = [f"record {index}: the quick brown fox jumps over {index % 11} lazy dogs" for index in range(2000)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"content": text}) + "\n" for text in documents))
    save_tokenizer(tmp_path / "tokenizer")
    spec = load_spec(
        ROOT / "jobs" / "tiny.yaml",
        [
            "name=text-files",
            "data.source=files",
            "data.files=[corpus.jsonl]",
            "data.text_field=content",
            "data.tokenizer=tokenizer",
            "data.validation_fraction=0.1",
            "data.block_size=32",
            "deepspeed.zero_stage=3",
            f"training.steps={STEPS}",
            f"training.report_every={STEPS}",
            f"evaluation.every_steps={EVAL_EVERY}",
            "modularity.partition_at_step=0",
        ],
    )
    result = run_job(spec, tmp_path)

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.source"] == "files" and run.data.params["deepspeed.zero_stage"] == "3"
    losses = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/loss")}
    perplexities = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/perplexity")}
    assert sorted(losses) == sorted(perplexities) == [EVAL_EVERY - 1, STEPS - 1]
    assert all(perplexities[step] == pytest.approx(math.exp(loss)) for step, loss in losses.items())
    assert losses[STEPS - 1] < losses[EVAL_EVERY - 1] < math.log(300)  # learning, and better than uniform guessing
    assert not [key for key in run.data.metrics if key.startswith("eval/loss/")]  # no tasks in plain text
    assert len(client.get_metric_history(result.run_id, "task_loss")) == STEPS
    entries = list((tmp_path / "xcm-runs" / "data-cache").glob("files-*/description.json"))
    assert len(entries) == 1  # tokenized once by the driver; both workers read that entry
    assert json.loads(entries[0].read_text())["tokenizer"].startswith(str(tmp_path / "tokenizer"))

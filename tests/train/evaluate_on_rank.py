"""One rank of the two-process evaluation test (run as a script: ``rank world_size init_file result_file``).

A separate process rather than a fork: the pytest process may hold Ray's threads by the time this test runs.
Rank 0 also computes the reference, the mean token loss of one forward over every block in one process.
"""
import json
import sys
from types import SimpleNamespace

import torch

from orchestrator import metric_names
from orchestrator.spec import EvaluationSpec
from orchestrator.train.evaluation import Evaluator
from orchestrator.train.objectives import CausalLanguageModelling

VOCAB = 64


class TinyLanguageModel(torch.nn.Module):
    """Embedding and head, called like a transformers causal LM: ``model(input_ids=...).logits``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))  # [B, T, vocab]


def main(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = TinyLanguageModel()
    blocks = torch.randint(0, VOCAB, (12, 17), generator=torch.Generator().manual_seed(1))  # [n, block_size + 1]
    evaluator = Evaluator(model, CausalLanguageModelling(), {metric_names.EVAL_LOSS: blocks},
                          EvaluationSpec(every_steps=1), micro_batch_size=4, rank=rank, world_size=world_size,
                          last_step=9, device=torch.device("cpu"))
    metrics = evaluator.evaluate()
    if rank == 0:
        with torch.no_grad():
            logits = model(input_ids=blocks[:, :-1]).logits
        reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
        with open(result_file, "w") as handle:
            json.dump({"metrics": metrics, "reference": reference}, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

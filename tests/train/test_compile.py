"""training.compile: the clusterability loss compiles with the model, and compiled training equals eager.

Both run on CPU: dynamo's explain counts graph breaks without compiling; the equality test trains one process
(gloo, world size 1) through ``build_engine``, eager and compiled (inductor, which needs a C++ compiler), and
compares the loss and C of every step.
"""

import os

import pytest
import torch

from orchestrator.modularity import ClusterabilityRegulariser, find_matrix_groups, partition_group, regularise_groups
from tests.helpers import free_port, tiny_gpt2, tiny_spec

STEPS = 10
VOCAB = 64
LAMBDA = 20.0
TOLERANCE = 1e-4  # inductor fuses and reorders float32 arithmetic; eager-vs-eager is exact


def regularised(model: torch.nn.Module, weights_persist: bool) -> ClusterabilityRegulariser:
    """A differentiable regulariser on every MLP matrix of ``model``, under the contiguous partition (k = 4)."""
    regulariser = ClusterabilityRegulariser(differentiable=True, weights_persist=weights_persist)
    groups = find_matrix_groups(model)
    partitions = {
        group.name: partition_group(
            [matrix.weight() for matrix in group.inputs],
            [matrix.weight() for matrix in group.outputs],
            k=4,
            method="contiguous",
        )
        for group in groups
    }
    regularise_groups(regulariser, groups, partitions)
    return regulariser


@pytest.mark.parametrize("weights_persist", [True, False], ids=["zero0-2", "in-hook"])
def test_regulariser_does_not_break_a_transformer_block_graph(weights_persist):
    """A GPT-2 block with the clusterability hooks on its MLP matrices traces to one graph with no break."""
    model = tiny_gpt2(vocab_size=VOCAB)
    regulariser = regularised(model, weights_persist)
    block = model.transformer.h[0]
    hidden = torch.randn(2, 16, 64)
    explanation = torch._dynamo.explain(block)(hidden)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert len(regulariser.values()) == 2  # the hooks ran: c_fc and c_proj of this block


def train_curve(stage: int, compiled: bool) -> list[tuple[float, float]]:
    """(loss, mean C) of each of STEPS DeepSpeed steps on the tiny GPT-2, loss on, at ZeRO ``stage``."""
    from orchestrator.train.engine import build_engine

    spec = tiny_spec(f"deepspeed.zero_stage={stage}", f"training.compile={str(compiled).lower()}")
    engine = build_engine(tiny_gpt2(vocab_size=VOCAB), spec, world_size=1)
    regulariser = regularised(engine.module, weights_persist=True)
    generator = torch.Generator().manual_seed(0)
    curve = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (spec.training.micro_batch_size, 33), generator=generator)
        regulariser.clear()
        logits = engine(input_ids=tokens[:, :-1]).logits
        task = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss = task + regulariser.penalty(LAMBDA)
        mean_c = torch.stack(list(regulariser.values().values())).mean()
        engine.backward(loss)
        engine.step()
        curve.append((loss.item(), mean_c.item()))
    regulariser.remove()
    return curve


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group for DeepSpeed, torn down after the module's tests."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_compiled_training_equals_eager(process_group, stage):
    """Ten steps with the clusterability loss on give the same loss and C compiled as eager, at ZeRO ``stage``."""
    eager = train_curve(stage, compiled=False)
    compiled = train_curve(stage, compiled=True)
    assert eager[0] != eager[-1]  # the weights moved: the comparison covers training, not one forward
    for step, ((eager_loss, eager_c), (loss, c)) in enumerate(zip(eager, compiled, strict=True)):
        assert loss == pytest.approx(eager_loss, rel=TOLERANCE), f"step {step}"
        assert c == pytest.approx(eager_c, rel=TOLERANCE), f"step {step}"


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma"])
def test_transformer_families_build_with_sdpa_attention(family):
    """Every transformer family is built with PyTorch's fused scaled-dot-product attention, not the eager one."""
    from orchestrator.models import build_model

    model = build_model(tiny_spec(f"model.family={family}").model, vocab_size=VOCAB, seed=0)
    assert model.config._attn_implementation == "sdpa"


def test_compile_at_zero3_is_refused_with_the_fix():
    """training.compile with ZeRO-3 fails the spec checks with one line naming both ways out."""
    from orchestrator.spec_problems import SpecError

    with pytest.raises(SpecError, match=r"training\.compile: .*ZeRO-3.*Fix: set deepspeed\.zero_stage <= 2"):
        tiny_spec("training.compile=true", "deepspeed.zero_stage=3")

"""Attribution scored on ZeRO-3's partitions: two real DeepSpeed ranks (gloo, CPU, every parameter sharded) find
the circuit that ``attribution_weight_circuit`` finds on the same whole model, restore the weights bit for bit,
leave the gradients zeroed and never touch a whole matrix (the ranks are attribute_on_rank.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.circuit_tasks import language_metric
from orchestrator.circuits import attribution_weight_circuit
from orchestrator.sharded_attribution import key_value, order_keys
from tests.helpers import ROOT, free_port, tiny_gpt2
from tests.train.attribute_on_rank import IG_STEPS, TAUS, VOCAB, cluster_labels, task_batches

# bf16 keeps 8 significant bits: a value's rounding error is at most 2**-9 of it, one unit in its last place 2**-8
# to 2**-7 of it. The bf16 engine's forward and backward round every activation and gradient partition (the
# reference computes in float32 on the same bf16 weights), so its scores are held to one unit in the last place of
# the largest score, its metrics, faithfulness, CPR and CMD to two, and each circuit to the reference's weights
# but 1% (weights whose scores are within rounding of the cut may swap).
BF16_SCORES, BF16_METRICS, BF16_SHARED = 2**-7, 2**-6, 0.99


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """What the two ranks report, and the whole-model circuit of the same trained weights."""
    directory = tmp_path_factory.mktemp("sharded-attribution")
    script = Path(__file__).with_name("attribute_on_rank.py")
    environment = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(directory)],
            env=environment | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(2)
    ]
    try:
        assert [process.wait(timeout=600) for process in ranks] == [0, 0]
    finally:
        for process in ranks:  # a failed or timed-out rank leaves its peer waiting in a collective
            if process.poll() is None:
                process.kill()
                process.wait()
    model = tiny_gpt2(vocab_size=VOCAB)
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
    found = {precision: _circuit(directory / precision) for precision in ("fp32", "bf16")}
    return {
        "sharded": found["fp32"][0],
        "ranks": found["fp32"][1],
        "reference": _reference(model),
        "bf16": found["bf16"][0],
        "bf16 ranks": found["bf16"][1],
        "bf16 reference": _reference(_with_weights(model, directory / "bf16" / "weights.pt")),
    }


def _circuit(directory: Path) -> tuple[dict, list[dict]]:
    """One engine's circuit (rank 0's file) and what each rank checked of its own partitions."""
    own = [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    return torch.load(directory / "circuit.pt", weights_only=True), own


def _reference(model: torch.nn.Module):
    """The whole-model circuit, computed as the circuits actor computes it: on a float32 model."""
    return attribution_weight_circuit(
        model.eval(), task_batches(), language_metric, ig_steps=IG_STEPS, taus=TAUS, partition=cluster_labels(model)
    )


def _with_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A float32 copy of `model` holding the engine's weights (bf16 values, exactly), as the actor receives them."""
    copy = tiny_gpt2(vocab_size=VOCAB)
    copy.load_state_dict(model.state_dict())
    parameters = dict(copy.named_parameters())
    with torch.no_grad():
        for name, weight in torch.load(path, weights_only=True).items():
            parameters[name].copy_(weight)
    return copy


@pytest.mark.slow
def test_sharded_scores_and_masks_equal_the_whole_model(two_ranks):
    """Each weight's integrated-gradient score equals the whole-model one to float32 rounding, and every τ's
    circuit keeps exactly the same weights."""
    sharded, reference = two_ranks["sharded"], two_ranks["reference"]
    assert sorted(sharded["scores"]) == sorted(reference.scores) and len(reference.scores) == 4
    largest = max(float(score.abs().max()) for score in reference.scores.values())
    for name, score in reference.scores.items():
        assert float((sharded["scores"][name] - score).abs().max()) <= 1e-5 * largest, name
    for tau, mask in reference.masks.items():
        assert all(torch.equal(sharded["masks"][tau][name], kept) for name, kept in mask.items()), tau


@pytest.mark.slow
def test_sharded_faithfulness_and_sizes_equal_the_whole_model(two_ranks):
    """The full and zeroed metrics, f on the grid and at every bisected count, size_at, the per-matrix sizes,
    locality, CPR and CMD equal the whole-model circuit's."""
    sharded, reference = two_ranks["sharded"], two_ranks["reference"]
    assert sharded["full"] == pytest.approx(reference.full, rel=1e-6)
    assert sharded["none"] == pytest.approx(reference.none, rel=1e-6)
    assert sharded["faithfulness"].tolist() == pytest.approx(reference.faithfulness.tolist(), abs=1e-5)
    assert sorted(sharded["curve"]) == sorted(reference.curve)
    assert sharded["size_at"] == reference.size_at
    assert 0 < reference.size_at[0.5] < reference.size_at[0.9] < 1  # the bisection had work to do
    assert sharded["sizes_at"] == reference.sizes_at
    for tau, locality in reference.locality.items():
        assert sharded["locality"][tau] == pytest.approx(locality.share, abs=1e-12)
        assert all(torch.equal(sharded["blocks"][tau][name], block) for name, block in locality.blocks.items())
    assert sharded["cpr"] == pytest.approx(reference.cpr, abs=1e-5)
    assert sharded["cmd"] == pytest.approx(reference.cmd, abs=1e-5)
    assert sharded["method"].endswith("on 2 ZeRO-3 ranks")


@pytest.mark.slow
def test_weights_restored_bit_for_bit_and_gradients_left_zeroed(two_ranks):
    """In fp32 and bf16, on every rank the partitions and the optimizer's fp32 master partitions are bit-identical
    after the call, every gradient partition is zero, no micro-step is pending and the module is back in training
    mode."""
    for own in two_ranks["ranks"] + two_ranks["bf16 ranks"]:
        assert own["weights_identical"] and own["masters_identical"]
        assert own["grads_zero"] and own["micro_step_id"] == 0 and own["training_mode"]


@pytest.mark.slow
def test_no_rank_touches_a_whole_scoped_matrix(two_ranks):
    """No torch call in the sharded module takes or returns a tensor as large as the smallest scoped matrix: each
    rank works on its partitions (half a matrix here), and only DeepSpeed's own gather sees whole matrices."""
    for own in two_ranks["ranks"] + two_ranks["bf16 ranks"]:
        assert 0 < own["largest_touched"] <= own["smallest_scoped"] // 2 + 1, own


@pytest.mark.slow
def test_bf16_scores_and_circuits_agree_with_the_whole_model_to_bf16_rounding(two_ranks):
    """A bf16 engine's scores equal the float32 whole-model scores of its own bf16 weights (what the circuits actor
    computes for a bf16 job) to bf16 rounding, its circuits keep the same weights but a few ties of rounding, and
    its metrics, faithfulness, CPR and CMD agree to bf16 rounding."""
    sharded, reference = two_ranks["bf16"], two_ranks["bf16 reference"]
    assert all(own["dtype"] == str(torch.bfloat16) for own in two_ranks["bf16 ranks"])
    largest = max(float(score.abs().max()) for score in reference.scores.values())
    for name, score in reference.scores.items():
        assert float((sharded["scores"][name] - score).abs().max()) <= BF16_SCORES * largest, name
    for tau, mask in reference.masks.items():
        kept = max(sum(int(m.sum()) for m in masks.values()) for masks in (mask, sharded["masks"][tau]))
        shared = sum(int((sharded["masks"][tau][name] & m).sum()) for name, m in mask.items())
        assert shared >= BF16_SHARED * kept, tau
    assert sharded["full"] == pytest.approx(reference.full, rel=BF16_METRICS)
    assert sharded["none"] == pytest.approx(reference.none, rel=BF16_METRICS)
    assert sharded["faithfulness"].tolist() == pytest.approx(reference.faithfulness.tolist(), abs=BF16_METRICS)
    assert sharded["cpr"] == pytest.approx(reference.cpr, abs=BF16_METRICS)
    assert sharded["cmd"] == pytest.approx(reference.cmd, abs=BF16_METRICS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_keys_sort_as_the_floats_and_map_back(dtype):
    """The integer keys of the global cut order floats as the floats order (negatives, both zeros, infinities,
    subnormals), equal floats get equal keys, and each key maps back to its float."""
    tiny = np.finfo(dtype).smallest_subnormal
    values = np.array([-np.inf, -3.5, -1.0, -tiny, -0.0, 0.0, tiny, 1e-30, 1.0, 2.5, np.inf], dtype=dtype)
    values = np.concatenate([values, np.random.default_rng(0).standard_normal(1000).astype(dtype)])
    keys = order_keys(values)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order]) >= 0)
    assert np.array_equal(np.diff(keys[order]) == 0, np.diff(values[order]) == 0)
    assert all(key_value(int(key), dtype) == value for key, value in zip(keys, values, strict=True))

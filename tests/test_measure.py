"""`xcm measure`: clusterability of saved models under the joint, the papers' and the re-paired partitions."""

import pytest
import torch
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.cli import main
from orchestrator.measure import VARIANTS, load_model, measure_model, parse_k
from orchestrator.modularity import (
    ClusterabilityRegulariser,
    clusterability,
    find_matrix_groups,
    partition_group,
    planted_blocks,
    regularise_groups,
)
from tests.helpers import run_xcm, tiny_gpt2

K = 4


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """A tiny GPT-2 whose MLP matrices are k planted blocks in noise (rows and columns shuffled), saved to disk,
    with each matrix's true C (under its planted labels)."""
    model, true_c = tiny_gpt2(vocab_size=40, n_positions=32), {}
    for index, matrix in enumerate(m for group in find_matrix_groups(model) for m in group.matrices):
        n_out, n_in = matrix.shape
        # Seeds apart from measure's own (0): the same seed would draw the planted labels as its "random" ones.
        weight, rows, cols = planted_blocks(n_out, n_in, K, noise=0.3, seed=100 + index)  # [n_out, n_in]
        with torch.no_grad():
            matrix.module.weight.copy_(weight.T)  # GPT-2's Conv1D stores [n_in, n_out]
        true_c[matrix.name] = float(clusterability(weight, rows, cols, K))
    directory = tmp_path_factory.mktemp("planted")
    model.save_pretrained(directory)
    return directory, true_c


def test_joint_partition_reads_the_planted_clusterability(planted_model):
    """On planted blocks the joint partition and the mass-re-paired papers' variant read the true C; random ~ 1/k."""
    directory, true_c = planted_model
    measurements = measure_model(load_model(str(directory), "unused"), [K])
    assert {m.matrix for m in measurements} == set(true_c)
    for m in measurements:
        assert m.clusterability["joint"] == pytest.approx(true_c[m.matrix], abs=0.01)
        assert m.clusterability["separate_mass"] == pytest.approx(true_c[m.matrix], abs=0.01)
        assert m.clusterability["random"] == pytest.approx(1 / K, abs=0.03)
        assert m.clusterability["separate_label"] <= m.clusterability["separate_mass"] + 1e-6


def test_measure_sweeps_k_prints_a_table_and_logs_it(tmp_path, capsys, monkeypatch):
    """`xcm measure <dir> --k 2..4`: a row per matrix and k, random C ~ 1/k, an MLflow run with k as the step."""
    directory = tmp_path / "random-init"
    tiny_gpt2(vocab_size=40, n_positions=32).save_pretrained(directory)
    monkeypatch.chdir(tmp_path)
    assert main(["measure", str(directory), "--k", "2..4"]) == 0
    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines() if line.startswith(("transformer.", "model mean"))]
    assert len(rows) == 4 * 3 + 3  # 4 matrices x 3 values of k, then the model mean per k
    for row in rows[-3:]:
        k, values = int(row[2]), dict(zip(VARIANTS, map(float, row[3:]), strict=True))
        assert values["random"] == pytest.approx(1 / k, abs=0.03)
        assert values["joint"] >= values["random"] - 0.01  # the best partition beats a random one
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'xcm-runs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("xcm-measure").experiment_id])[0]
    joint = client.get_metric_history(run.info.run_id, metric_names.measured_clusterability("joint"))
    assert sorted(m.step for m in joint) == [2, 3, 4]
    assert [item.path for item in client.list_artifacts(run.info.run_id)] == ["measure.csv"]


def test_briefly_trained_model_measures_modular(tmp_path):
    """A tiny GPT-2 trained 40 steps with the clusterability loss reads C far above random under the joint partition."""
    model = tiny_gpt2(vocab_size=40, n_positions=32)
    groups = find_matrix_groups(model)
    regulariser = ClusterabilityRegulariser()
    regularise_groups(
        regulariser,
        groups,
        {
            group.name: partition_group([m.weight() for m in group.inputs], [m.weight() for m in group.outputs], K)
            for group in groups
        },
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(40):
        regulariser.clear()
        loss = model(tokens, labels=tokens).loss + regulariser.penalty(20.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    regulariser.remove()
    model.save_pretrained(tmp_path / "trained")
    measurements = measure_model(load_model(str(tmp_path / "trained"), "unused"), [K])
    for m in measurements:
        assert m.clusterability["joint"] > m.clusterability["random"] + 0.3, m


@pytest.mark.slow
def test_classifier_checkpoint_is_measured(tmp_path, mnist_mlp_checkpoint):
    """`xcm measure <run directory>` of an MNIST MLP that `xcm run` trained with the loss (xcm's own classifier, which
    has no Hugging Face form to export) verifies and loads the checkpoint and measures its four fc matrices: the
    trained weights read modular under the joint partition (model mean 0.69 here; 0.36-0.38 at seeds 0-2 of a
    random initialisation of this width), about 1/k under random partitions."""
    measured = run_xcm("measure", str(mnist_mlp_checkpoint), "--k", str(K), cwd=tmp_path, timeout=300)
    assert measured.returncode == 0, measured.stderr[-2000:]
    lines = measured.stdout.splitlines()
    rows = {line.split()[0]: line.split()[2:] for line in lines if line.startswith(("classifier", "model mean"))}
    assert sorted(rows) == [*(f"classifier.fc{i}" for i in range(1, 5)), "model"], measured.stdout
    for name, row in rows.items():
        values = dict(zip(VARIANTS, map(float, row[-len(VARIANTS) :]), strict=True))
        assert values["joint"] > values["random"] and values["random"] == pytest.approx(1 / K, abs=0.05), (name, values)
    assert float(rows["model"][-len(VARIANTS)]) > 0.55, measured.stdout


def test_k_accepts_a_count_a_range_and_a_list():
    """--k parses 4, 2..20 and 2,4,8; anything else, or k < 2, is an error naming the forms."""
    assert parse_k("4") == [4] and parse_k("2..5") == [2, 3, 4, 5] and parse_k("8,2,4") == [2, 4, 8]
    for bad in ("1", "two", "5..3", ""):
        with pytest.raises(ValueError, match=r"2\.\.20"):
            parse_k(bad)


def test_unloadable_model_exits_1_with_the_reason(tmp_path, capsys, monkeypatch):
    """A hub name that cannot be fetched (offline) is reported, not a traceback."""
    monkeypatch.chdir(tmp_path)
    assert main(["measure", "no-such-org/no-such-model", "--k", "4"]) == 1
    assert "cannot load 'no-such-org/no-such-model'" in capsys.readouterr().err

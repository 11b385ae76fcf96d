"""`xcm circuits`: a trained model's circuits and specialization printed and logged to MLflow, read back with
MLflow's own client; greedy refused for language models; an export's partition table read back or refused."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from orchestrator import metric_names
from orchestrator.circuit_command import read_partition_table
from orchestrator.circuit_report import CircuitsError, job_problems, methods_for
from orchestrator.cli import main
from orchestrator.data.synthetic import generate_examples
from orchestrator.data.tokenizer import ByteTokenizer
from orchestrator.modularity import find_matrix_groups, partition_group
from orchestrator.partitioning.table import partition_table
from orchestrator.spec import JobSpec
from tests.helpers import run_xcm, tiny_gpt2

K = 2


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, busy machine two threads contend and make these small models ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spectral(model, k=K):
    return {
        group.name: partition_group([m.weight() for m in group.inputs], [m.weight() for m in group.outputs], k)
        for group in find_matrix_groups(model)
    }


def client_for(directory) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{directory / 'xcm-runs' / 'mlflow.db'}")


def only_run(client, experiment="xcm-circuits"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_paths(client, run_id, path=None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_greedy_is_refused_for_language_models(tmp_path, capsys, monkeypatch):
    """--method greedy on a GPT-2 exits 1 naming --method attribution; a job's circuits.method: greedy on a
    transformers family is a problem naming circuits.method: attribution; classifiers get greedy under all."""
    tiny_gpt2(vocab_size=259).save_pretrained(tmp_path / "gpt")
    monkeypatch.chdir(tmp_path)
    assert main(["circuits", "gpt", "--method", "greedy", "--tasks", "synthetic:add"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "greedy finder" in error and "use --method attribution" in error
    assert not (tmp_path / "xcm-runs" / "mlflow.db").exists()  # refused before anything was logged
    (problem,) = job_problems(JobSpec.model_validate({"circuits": {"method": "greedy"}}))
    assert "circuits.method: attribution" in problem
    assert (
        job_problems(JobSpec.model_validate({"model": {"family": "mnist_mlp"}, "circuits": {"method": "greedy"}})) == []
    )
    assert methods_for("all", "classifier") == ["greedy", "attribution", "specialization"]
    assert methods_for("all", "language") == ["attribution", "specialization"]
    with pytest.raises(CircuitsError):
        methods_for("greedy", "language")


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--taus", "0.9,1.5"], "--taus: Input should be less than or equal to 1"), (["--k", "1"], "--k 1")],
)
def test_bad_options_exit_2_before_loading(tmp_path, capsys, monkeypatch, option, message):
    """A τ outside (0, 1] or fewer than 2 clusters: one line, exit 2, before the model is looked for."""
    monkeypatch.chdir(tmp_path)
    assert main(["circuits", "no-such-model", *option]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "xcm-runs").exists()


def test_export_partition_table_reads_back_and_a_wrong_one_is_refused(tmp_path):
    """partition.parquet as export writes it gives back the same group partitions; a table whose units do not
    fit the model's matrices is refused rather than guessed at."""
    model = tiny_gpt2()
    partitions = spectral(model)
    pq.write_table(partition_table(find_matrix_groups(model), partitions), tmp_path / "partition.parquet")
    read = read_partition_table(tmp_path / "partition.parquet", model)
    assert set(read) == set(partitions)
    for name, partition in partitions.items():
        assert read[name].k == partition.k and torch.equal(read[name].hidden, partition.hidden)
        assert all(torch.equal(a, b) for a, b in zip(read[name].inputs, partition.inputs, strict=True))
    narrower = tiny_gpt2(n_inner=128)
    with pytest.raises(CircuitsError, match="does not label units"):
        read_partition_table(tmp_path / "partition.parquet", narrower)


def test_forged_checkpoint_runs_no_code_and_logs_nothing(tmp_path, checkpoint_files, marker, capsys, monkeypatch):
    """A checkpoint whose model file holds a pickle payload under a recomputed manifest is refused in one line
    (exit 1) before any file of it is read: the payload never runs and no MLflow run is made."""
    forged = checkpoint_files.write(tmp_path / "run", 20, zero_stage=0, transformers_model=True)
    checkpoint_files.plant_payload(forged / "deepspeed" / "step-20" / "mp_rank_00_model_states.pt", marker)
    checkpoint_files.recompute_manifest(forged)
    monkeypatch.chdir(tmp_path)
    assert main(["circuits", str(forged), "--tasks", "synthetic:add"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert "signature does not verify" in error[-1] and error[-1].startswith("xcm circuits:")
    assert not marker.exists()
    assert not (tmp_path / "xcm-runs" / "mlflow.db").exists()


def test_bad_task_file_is_one_line_and_logs_nothing(tmp_path, capsys, monkeypatch):
    """A task file outside the working directory, or with a broken line, exits 1 with one line naming it; no
    MLflow run is made."""
    tiny_gpt2(vocab_size=259).save_pretrained(tmp_path / "work" / "gpt")
    (tmp_path / "secret.jsonl").write_text('{"prompt": "p", "answer": "a"}\n' * 4)
    (tmp_path / "work" / "broken.jsonl").write_text('{"prompt": "p", "answer": "a"}\n{"prompt": 1}\n')
    monkeypatch.chdir(tmp_path / "work")
    for spec, message in (("jsonl:../secret.jsonl", "resolves outside"), ("jsonl:broken.jsonl", "line 2")):
        assert main(["circuits", "gpt", "--method", "attribution", "--tasks", spec]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in error and error.startswith("xcm circuits:")
    assert not (tmp_path / "work" / "xcm-runs" / "mlflow.db").exists()


def trained_tiny_gpt2(steps: int):
    """A tiny GPT-2 on xcm's byte vocabulary trained `steps` Adam steps on the synthetic corpus (add, copy)."""
    tokenizer = ByteTokenizer()
    texts = [example.text for example in generate_examples(512, seed=1, tasks=["add", "copy"])]
    rows = [[tokenizer.eos_id, *tokenizer.encode(text)] for text in texts]
    width = max(map(len, rows))
    tokens = torch.tensor([row + [tokenizer.eos_id] * (width - len(row)) for row in rows])
    model = tiny_gpt2(vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = tokens[torch.randint(0, len(tokens), (32,), generator=generator)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_tiny_gpt2_synthetic_attribution_logged_to_mlflow(tmp_path, capsys, monkeypatch):
    """A briefly trained tiny GPT-2 beside its partition.parquet: attribution circuits of the synthetic tasks,
    per-τ sizes, locality and the specialization index printed and logged; the artifacts read back."""
    model = trained_tiny_gpt2(steps=150)
    model.save_pretrained(tmp_path / "gpt")
    partitions = spectral(model)
    pq.write_table(partition_table(find_matrix_groups(model), partitions), tmp_path / "gpt" / "partition.parquet")
    monkeypatch.chdir(tmp_path)
    status = main([
        "circuits", "gpt", "--tasks", "synthetic:add,copy", "--method", "all", "--ig-steps", "2",
        "--taus", "0.8,0.9", "--null-draws", "2", "--max-examples", "40",
    ])  # fmt: skip
    output = capsys.readouterr()
    assert status == 0, output.err
    assert "partition.parquet beside the model (k=2)" in output.out and "specialization index" in output.out
    client = client_for(tmp_path)
    run = only_run(client)
    metrics = run.data.metrics
    for task in ("add", "copy"):
        size = metrics[metric_names.circuit_size(task, 0.9)]
        assert 0 < metrics[metric_names.circuit_size(task, 0.8)] <= size <= 1
        assert metrics[metric_names.circuit_size(task)] == size
        assert 0 <= metrics[metric_names.circuit_locality(task)] <= 1
    assert 0 <= metrics[metric_names.SPECIALIZATION_INDEX] <= 1
    assert metric_names.SPECIALIZATION_INDEX_NULL_MEAN in metrics
    assert run.data.params["partition"] == "partition.parquet beside the model"
    paths = artifact_paths(client, run.info.run_id)
    assert {"circuits/attribution/add.parquet", "specialization/damage.parquet", "specialization/damage.png",
            "specialization/dependence.png", "circuits.txt"} <= paths  # fmt: skip
    summary = pq.read_table(client.download_artifacts(run.info.run_id, "circuits/attribution/add.parquet"))
    rows = summary.to_pylist()
    assert {row["tau"] for row in rows} == {0.8, 0.9}
    kept = sum(row["kept"] for row in rows if row["tau"] == 0.9) / sum(row["size"] for row in rows if row["tau"] == 0.9)
    assert kept == pytest.approx(metrics[metric_names.circuit_size("add", 0.9)])
    damage = pq.read_table(client.download_artifacts(run.info.run_id, "specialization/damage.parquet"))
    assert damage.column_names == ["cluster", "add", "copy"] and damage.num_rows == K


@pytest.mark.slow
def test_mnist_mlp_checkpoint_greedy_attribution_and_specialization(tmp_path, mnist_mlp_checkpoint):
    """`xcm run` trains the MNIST MLP on digits into a checkpoint; `xcm circuits <run directory>` verifies and
    loads it with its own partition, finds greedy and attribution circuits of two labels and the specialization
    index, and the run in experiment xcm-circuits holds their metrics at the checkpoint's step and the artifacts."""
    run_directory = mnist_mlp_checkpoint
    result = run_xcm(
        "circuits", str(run_directory), "--tasks", "labels:0,1", "--null-draws", "2", "--ig-steps", "2",
        "--max-examples", "60", cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the checkpoint's (k=4)" in result.stdout and "skipped" not in result.stdout, result.stdout
    client = client_for(tmp_path)
    run = only_run(client)
    history = client.get_metric_history(run.info.run_id, metric_names.circuit_size("label_0"))
    assert [point.step for point in history] == [40]
    metrics = run.data.metrics
    for task in ("label_0", "label_1"):
        assert 0 < metrics[metric_names.circuit_size(task)] < 1  # the exact greedy circuit's
        assert metrics[metric_names.circuit_size(task)] == metrics[f"circuits/greedy/{task}/size"]
        assert 0 < metrics[metric_names.circuit_size(task, 0.9)] <= 1
        assert 0 <= metrics[metric_names.circuit_locality(task)] <= 1
    assert metric_names.SPECIALIZATION_INDEX in metrics
    assert (
        run.data.params["trained_run_id"]
        == json.loads((sorted(run_directory.glob("step-*"))[-1] / "xcm" / "state.json").read_text())["run_id"]
    )
    paths = artifact_paths(client, run.info.run_id)
    assert {"circuits/greedy/label_0.parquet", "circuits/attribution/label_1.parquet",
            "specialization/damage.png", "specialization/damage.parquet"} <= paths  # fmt: skip
    greedy = pq.read_table(client.download_artifacts(run.info.run_id, "circuits/greedy/label_0.parquet")).to_pylist()
    assert {row["matrix"] for row in greedy} == {f"classifier.fc{i}.weight" for i in range(1, 5)}
    share = sum(row["kept"] for row in greedy) / sum(row["size"] for row in greedy)
    assert share == pytest.approx(metrics[metric_names.circuit_size("label_0")])


def test_modular_addition_circuits_use_its_training_pairs():
    """Modular addition's label tasks are the pairs it trains on, not its held-out ones (on which a model that has
    not grokked is worse than with every cluster ablated, leaving the specialization index undefined); every
    answer has examples, and the model gets the greedy finder under method all."""
    from orchestrator.circuit_report import loaded_model_from_spec, model_kind
    from orchestrator.data.sources import BUILDERS

    spec = JobSpec.model_validate(
        {
            "model": {"family": "modular_addition"},
            "data": {"source": "modular_addition", "modulus": 13, "validation_fraction": 0.7},
        }
    )
    loaded = loaded_model_from_spec(spec)
    train = BUILDERS["modular_addition"](spec.data, spec.model).train
    assert torch.equal(loaded.labelled.inputs, train.inputs) and torch.equal(loaded.labelled.labels, train.labels)
    assert len(train) < 0.5 * 13 * 13 and set(train.labels.tolist()) == set(range(13))
    assert methods_for("all", model_kind(spec)) == ["greedy", "attribution", "specialization"]


def test_circuits_examples_held_out_and_a_method_list():
    """circuits.examples: held_out gives a grokked modular addition its held-out pairs; a job that holds none out
    is a problem naming data.validation_fraction, as is the key on a language model; circuits.method as a list
    runs attribution and specialization without greedy, and greedy in a list is refused for a language model."""
    from pydantic import ValidationError

    from orchestrator.circuit_report import loaded_model_from_spec
    from orchestrator.data.sources import BUILDERS

    def spec(fraction: float, circuits: dict) -> JobSpec:
        data = {"source": "modular_addition", "modulus": 13, "validation_fraction": fraction}
        return JobSpec.model_validate({"model": {"family": "modular_addition"}, "data": data, "circuits": circuits})

    held_out = spec(0.5, {"examples": "held_out", "method": ["specialization", "attribution"]})
    loaded = loaded_model_from_spec(held_out)
    validation = BUILDERS["modular_addition"](held_out.data, held_out.model).validation
    assert torch.equal(loaded.labelled.inputs, validation.inputs)
    assert torch.equal(loaded.labelled.labels, validation.labels)
    assert job_problems(held_out) == []
    assert methods_for(held_out.circuits.method, "classifier") == ["attribution", "specialization"]
    (problem,) = job_problems(spec(0, {"examples": "held_out"}))
    assert "set data.validation_fraction" in problem
    (problem,) = job_problems(JobSpec.model_validate({"circuits": {"examples": "train"}}))
    assert "circuits.examples" in problem
    with pytest.raises(CircuitsError):
        methods_for(["attribution", "greedy"], "language")
    for bad in ("foo", ["attribution", "all"], []):
        with pytest.raises(ValidationError) as error:
            spec(0.5, {"method": bad})
        assert error.value.error_count() == 1  # one line for the key, not one per member of its union


def test_examples_option_picks_a_classifier_checkpoints_examples_and_is_refused_for_a_language_model(
    tmp_path, capsys, monkeypatch
):
    """`xcm circuits --examples` replaces the checkpoint job's circuits.examples: train gives modular addition its
    training pairs and held_out its held-out ones (the job's own choice when absent); held_out of a job that held
    none out, and the flag on a language model (a model directory), are one line naming the fix, exit 1, before
    anything is loaded or logged."""
    from orchestrator.circuit_command import with_examples
    from orchestrator.circuit_report import loaded_model_from_spec
    from orchestrator.data.sources import BUILDERS

    def spec(fraction: float, examples: str) -> JobSpec:
        data = {"source": "modular_addition", "modulus": 13, "validation_fraction": fraction}
        return JobSpec.model_validate(
            {"model": {"family": "modular_addition"}, "data": data, "circuits": {"examples": examples}}
        )

    job = spec(0.5, "held_out")
    data = BUILDERS["modular_addition"](job.data, job.model)
    for examples, expected in ((None, data.validation), ("train", data.train), ("held_out", data.validation)):
        chosen = with_examples(spec(0.5, "train") if examples == "held_out" else job, examples)
        assert torch.equal(loaded_model_from_spec(chosen).labelled.inputs, expected.inputs), examples
    with pytest.raises(CircuitsError, match=r"held no examples out.*use --examples train"):
        with_examples(spec(0, "train"), "held_out")
    tiny_gpt2(vocab_size=259).save_pretrained(tmp_path / "gpt")
    monkeypatch.chdir(tmp_path)
    assert main(["circuits", "gpt", "--examples", "train", "--tasks", "synthetic:add"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "xcm circuits: --examples picks a classifier's examples; a language model's tasks bring their own: remove it"
    )
    assert not (tmp_path / "xcm-runs" / "mlflow.db").exists()


@pytest.mark.slow
def test_examples_option_reaches_a_classifier_checkpoints_label_tasks(mnist_mlp_checkpoint, tmp_path):
    """`xcm circuits <MNIST MLP checkpoint> --examples train` and `--examples held_out` measure the label tasks on
    different examples (each run's full-model metric differs) and each run records the examples it used."""
    for examples in ("train", "held_out"):
        result = run_xcm(
            "circuits", str(mnist_mlp_checkpoint), "--tasks", "labels:0", "--method", "attribution", "--ig-steps",
            "2", "--taus", "0.9", "--max-examples", "60", "--examples", examples,
            cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("xcm-circuits").experiment_id])
    measured = {
        run.data.params["examples"]: run.data.metrics["circuits/attribution/label_0/metric_full"] for run in runs
    }
    assert sorted(measured) == ["held_out", "train"]
    assert measured["train"] != measured["held_out"]

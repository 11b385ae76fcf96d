"""The trained model in MLflow: logged from a signed checkpoint into the run (a real SQLite store, the real child
process), loaded back with MLflow's own flavours, registered on request; a model that cannot be logged leaves the
run's metrics. And what the run itself carries: its experiment's kind, sortable name, description, dataset input
and system metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_spec

K = 2


@pytest.fixture(autouse=True)
def _mlflow_client_settings():
    """tracking.client sets MLflow's retry and telemetry variables process-wide; each test starts without them."""
    from orchestrator import tracking

    with pytest.MonkeyPatch.context() as patch:
        for key in tracking._CLIENT_ENVIRONMENT:
            patch.delenv(key, raising=False)
        yield


def job(tmp_path, *overrides: str):
    """The tiny job resolved under ``tmp_path``, tracked in a SQLite store there, and its new MLflow run."""
    from orchestrator import tracking

    spec = tiny_spec(*overrides, log_model=None).resolved(tmp_path)
    run_id = tracking.start_run(spec.tracking, spec.name, spec.flat_params(), job=spec)
    return spec, run_id


def write_checkpoint(spec, run_id: str, model: torch.nn.Module, transformers_config: dict | None = None) -> None:
    """The run's last checkpoint as a ZeRO-0 run leaves it (rank 0's module file, xcm's files, a contiguous
    partition of the model's groups), signed with the tests' key."""
    from orchestrator.modularity import find_matrix_groups, partition_group
    from orchestrator.train import checkpoint_store as store

    step = spec.training.steps
    directory = Path(store.run_directory(spec, run_id)) / store.checkpoint_name(step)
    shards = directory / store.DEEPSPEED / f"step-{step}"
    shards.mkdir(parents=True)
    torch.save({"module": as_views_of_one_buffer(model.state_dict())}, shards / "mp_rank_00_model_states.pt")
    (directory / "xcm").mkdir()
    state = store.CheckpointState(
        step=step,
        data_position=step,
        world_size=1,
        zero_stage=0,
        run_id=run_id,
        deepspeed_tag=f"step-{step}",
        session="launch",
    )
    (directory / store.STATE).write_text(state.to_json())
    (directory / store.JOB).write_text(spec.to_yaml())
    groups = find_matrix_groups(model, spec.modularity.matrices)
    partitions = {
        group.name: partition_group(
            [m.weight() for m in group.inputs], [m.weight() for m in group.outputs], K, "contiguous"
        ).to_dict()
        for group in groups
    }
    (directory / store.PARTITION).write_text(json.dumps({"partitions": partitions}))
    if transformers_config is not None:
        (directory / store.MODEL_CONFIG).write_text(json.dumps(transformers_config))
    store.write_manifest(directory, store.file_records(directory))


def as_views_of_one_buffer(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as DeepSpeed consolidates them: views into one flat buffer, a tied weight one tensor under two
    names (torch.save keeps both)."""
    distinct = {tensor.data_ptr(): tensor for tensor in weights.values()}
    flat = torch.cat([tensor.flatten() for tensor in distinct.values()])
    views, offset = {}, 0
    for pointer, tensor in distinct.items():
        views[pointer] = flat[offset : offset + tensor.numel()].view_as(tensor)
        offset += tensor.numel()
    return {name: views[tensor.data_ptr()] for name, tensor in weights.items()}


def trained_gpt2(spec):
    """The tiny job's GPT-2 (byte vocabulary) with weights no fresh model has."""
    from orchestrator.models import build_model

    model = build_model(spec.model, 259, seed=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model.eval()


def logged_models(uri: str, run_id: str) -> list[str]:
    from orchestrator import tracking

    return [output.model_id for output in tracking.client(uri).get_run(run_id).outputs.model_outputs]


def test_logged_language_model_loads_back_with_its_tokenizer_and_the_trained_logits(tmp_path):
    """mlflow.transformers.load_model gives the checkpoint's logits and a tokenizer with xcm's byte ids; the
    partition is beside the model; tracking.register_model made it version 1 of that registered model."""
    import mlflow

    from orchestrator import tracking
    from orchestrator.data.tokenizer import ByteTokenizer
    from orchestrator.train.model_logging import log_trained_model

    spec, run_id = job(tmp_path, "tracking.register_model=xcm-tiny")
    model = trained_gpt2(spec)
    write_checkpoint(spec, run_id, model, model.config.to_dict())
    said = []
    log_trained_model(spec, run_id, said.append)

    (model_id,) = logged_models(spec.tracking.uri, run_id)
    assert re.fullmatch(
        rf"xcm: trained model logged to MLflow as models:/{model_id}, registered as xcm-tiny version 1 \(\d+ s\)",
        said[-1],
    )
    (version,) = tracking.client(spec.tracking.uri).search_model_versions("name = 'xcm-tiny'")
    assert (version.run_id, str(version.version)) == (run_id, "1")
    mlflow.set_tracking_uri(spec.tracking.uri)
    loaded = mlflow.transformers.load_model(f"models:/{model_id}", return_type="components")
    text = "clusterability: ok é"
    ids = loaded["tokenizer"](text)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert loaded["tokenizer"].eos_token_id == ByteTokenizer.eos_id
    inputs = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded["model"](input_ids=inputs).logits, model(input_ids=inputs).logits)
    artifacts = [item.path for item in tracking.client(spec.tracking.uri).list_logged_model_artifacts(model_id)]
    assert "partition.parquet" in artifacts
    assert "MLmodel" in artifacts


def test_classifier_is_logged_as_an_exported_program_with_the_trained_logits(tmp_path):
    """An MNIST MLP run's model comes back from mlflow.pytorch.load_model (a torch.export program, no pickle)
    giving the checkpoint's logits, for a batch size other than the example's."""
    import mlflow

    from orchestrator.models import build_model
    from orchestrator.train.model_logging import log_trained_model

    spec, run_id = job(tmp_path, "model.family=mnist_mlp", "data.source=digits", "modularity.k=4")
    model = build_model(spec.model, None, seed=3).eval()
    write_checkpoint(spec, run_id, model)
    log_trained_model(spec, run_id, lambda line: None)

    (model_id,) = logged_models(spec.tracking.uri, run_id)
    mlflow.set_tracking_uri(spec.tracking.uri)
    loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_model_above_the_size_limit_is_not_logged_unless_asked(tmp_path):
    """Over tracking.log_model_max_gb the model is not logged, with one line saying why and how to log it."""
    from orchestrator.train.model_logging import log_trained_model

    spec, run_id = job(tmp_path, "tracking.log_model_max_gb=0.0001")
    model = trained_gpt2(spec)
    write_checkpoint(spec, run_id, model, model.config.to_dict())
    said = []
    log_trained_model(spec, run_id, said.append)

    assert logged_models(spec.tracking.uri, run_id) == []
    assert "exceed tracking.log_model_max_gb (0.0001); set tracking.log_model: true" in said[-1]


def test_a_model_that_cannot_be_logged_leaves_the_run_and_its_metrics(tmp_path, caplog):
    """A checkpoint that no longer verifies: a warning and the run's failure-to-log tag, no exception; the run's
    metrics are still there and no model is logged."""
    from orchestrator import tracking
    from orchestrator.train import checkpoint_store as store
    from orchestrator.train.model_logging import FAILURE_TAG, log_trained_model

    spec, run_id = job(tmp_path)
    client = tracking.client(spec.tracking.uri)
    client.log_metric(run_id, "loss", 1.5, step=3)
    model = trained_gpt2(spec)
    write_checkpoint(spec, run_id, model, model.config.to_dict())
    (checkpoint,) = Path(store.run_directory(spec, run_id)).glob("step-*")
    (checkpoint / store.STATE).write_text((checkpoint / store.STATE).read_text().replace('"step": 60', '"step": 61'))

    log_trained_model(spec, run_id, lambda line: None)

    run = client.get_run(run_id)
    assert run.data.metrics == {"loss": 1.5}
    assert run.info.status == "RUNNING"  # the driver ends it as it would have
    assert "logging the trained model failed" in run.data.tags[FAILURE_TAG]
    assert logged_models(spec.tracking.uri, run_id) == []
    assert "The run's metrics and checkpoints are kept" in caplog.text


def test_a_model_that_cannot_be_registered_fails_the_run(tmp_path):
    """With tracking.register_model the same failure raises, so the driver ends the run FAILED with the reason."""
    from orchestrator.train.model_logging import ModelNotRegistered, log_trained_model

    spec, run_id = job(tmp_path, "tracking.register_model=xcm-tiny")
    with pytest.raises(ModelNotRegistered, match="so it is not registered as xcm-tiny"):
        log_trained_model(spec, run_id, lambda line: None)  # no checkpoint at all


def test_register_model_without_logging_is_a_spec_error(tmp_path):
    """tracking.register_model with tracking.log_model: false is refused when the job loads, naming both keys."""
    from orchestrator.spec import SpecError

    with pytest.raises(SpecError, match=r"tracking\.register_model: cannot register a model that is not logged"):
        tiny_spec("tracking.log_model=false", "tracking.register_model=xcm-tiny")


def test_new_run_is_a_described_training_run_with_a_sortable_name_and_its_dataset(tmp_path):
    """The experiment is of the model-training kind; the run is named <job>-<date>-<id prefix>, described, and
    has the synthetic corpus as its training input; its link opens the training view."""
    from orchestrator import tracking

    spec, run_id = job(tmp_path)
    client = tracking.client(spec.tracking.uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)

    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert re.fullmatch(rf"tiny-\d{{8}}-\d{{6}}-{run_id[:8]}", run.info.run_name)
    description = run.data.tags[tracking.DESCRIPTION_TAG]
    assert "gpt2 tiny" in description
    assert "ZeRO stage 2" in description
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "xcm's synthetic corpus"
    assert dataset_input.tags[0].value == "training"
    assert tracking.run_link(spec.tracking.uri, experiment.experiment_id, run_id).endswith(
        "?workflowType=machine_learning"
    )


def test_an_experiment_without_a_kind_gets_it_and_one_with_a_kind_keeps_it(tmp_path):
    """Experiments made before (no kind) open in the training view from the next run on; a user's GenAI
    experiment stays GenAI."""
    from orchestrator import tracking

    spec = tiny_spec().resolved(tmp_path)
    tracking.prepare_local_store(spec.tracking.uri)
    client = tracking.client(spec.tracking.uri)
    plain = client.create_experiment(spec.tracking.experiment)
    genai = client.create_experiment("agents", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.start_run(spec.tracking, spec.name, {})
    tracking.start_run(spec.tracking.model_copy(update={"experiment": "agents"}), spec.name, {})

    assert client.get_experiment(plain).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_metric_logger_logs_system_metrics_of_its_node(tmp_path):
    """Rank 0's logger samples CPU and memory into the run as MLflow system metrics, from a thread."""
    from orchestrator import tracking

    spec, run_id = job(tmp_path)
    logger = tracking.MetricLogger(
        spec.tracking.uri, run_id, tmp_path / "spool.jsonl", interval_s=0.2, system_metrics_every_s=0.5
    )
    logger.log({"loss": 1.0}, 0)
    time.sleep(2)
    logger.close()

    metrics = tracking.client(spec.tracking.uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
    assert metrics["loss"] == 1.0

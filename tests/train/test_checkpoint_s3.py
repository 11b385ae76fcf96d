"""Checkpoints on S3-compatible storage (a moto server on 127.0.0.1 standing in for MinIO): the endpoint in the
storage path's query survives locating a checkpoint, and what is downloaded is verified, not only the store."""

import pyarrow.fs as pafs
import pytest

from orchestrator.train import checkpoint_store as store
from orchestrator.train import resume
from orchestrator.train.export import ExportError, export_hf

BUCKET = "xcm-checkpoints"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3-compatible server; its address as pyarrow's endpoint_override."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}",
        scheme="http",
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        allow_bucket_creation=True,
    ).create_dir(BUCKET)
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_run(s3_endpoint, tmp_path, monkeypatch, checkpoint_files):
    """A run directory on the server with checkpoints at steps 10 and 20, as a URI carrying the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = f"s3://{BUCKET}/runs?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    filesystem = store.resolve(storage).filesystem
    run_name = f"job-{tmp_path.name[-8:]}"
    for step in (10, 20):
        checkpoint_files.write(tmp_path / run_name, step, zero_stage=0, transformers_model=True)
    pafs.copy_files(
        str(tmp_path / run_name),
        f"{BUCKET}/runs/{run_name}",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=filesystem,
    )
    return store.join(storage, run_name)


def test_endpoint_query_survives_locating_a_checkpoint(s3_run, s3_endpoint):
    """The located checkpoint's URI (what workers and `xcm resume` get) keeps the endpoint, and reads back to
    the same checkpoint on the same server; a step named in it is located exactly."""
    located = resume.locate(s3_run, "unused")
    assert located.state.step == 20
    assert located.uri.endswith(f"/step-00000020?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1")
    again = store.verified(*store.resolve(located.uri))
    assert again.state == located.state and again.uri == located.uri
    older = resume.locate(store.join(s3_run, "step-00000010"), "unused")
    assert older.state.step == 10 and s3_endpoint in older.uri


def test_rollback_on_s3_sets_the_later_checkpoint_aside_whole(s3_run):
    """On an object store (no directory rename) the later checkpoint is copied aside and still verifies there."""
    located = resume.locate(store.join(s3_run, "step-00000010"), "unused")
    moved = store.set_aside_newer(located).superseded
    assert store.problem(located.filesystem, f"{moved}/step-00000020") is None
    assert resume.locate(s3_run, "unused").state.step == 10


def test_forged_checkpoint_on_s3_is_skipped(s3_run, checkpoint_files, marker, tmp_path):
    """A payload uploaded over a shard, with a recomputed manifest, is skipped for the authentic previous one."""
    newest = resume.locate(s3_run, "unused")
    local = tmp_path / "download"
    pafs.copy_files(
        newest.path, str(local), source_filesystem=newest.filesystem, destination_filesystem=pafs.LocalFileSystem()
    )
    checkpoint_files.plant_payload(local / "deepspeed" / "step-20" / "mp_rank_00_model_states.pt", marker)
    checkpoint_files.recompute_manifest(local)
    pafs.copy_files(
        str(local), newest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=newest.filesystem
    )
    assert resume.locate(s3_run, "unused").state.step == 10
    assert not marker.exists()


def test_export_verifies_its_download_not_only_the_store(s3_run, checkpoint_files, marker, tmp_path, monkeypatch):
    """A shard swapped in the store after the checkpoint verified there, before the download, is caught in the
    download: export refuses and nothing of it is unpickled."""
    real_locate = resume.locate

    def locate_then_swap(target, tracking_uri):
        located = real_locate(target, tracking_uri)
        swapped = tmp_path / "swapped.pt"
        checkpoint_files.plant_payload(swapped, marker)
        # the attacker writes the store between the check and the download
        with located.filesystem.open_output_stream(
            f"{located.path}/deepspeed/step-20/mp_rank_00_model_states.pt"
        ) as stream:
            stream.write(swapped.read_bytes())
        return located

    monkeypatch.setattr(resume, "locate", locate_then_swap)
    with pytest.raises(ExportError, match=r"download .* does not verify"):
        export_hf(s3_run, tmp_path / "hf", "unused")
    assert not marker.exists() and not (tmp_path / "hf").exists()

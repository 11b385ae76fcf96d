"""Whether a cluster is this machine, from the nodes it reports; which of a job's paths a remote cluster cannot see."""

from orchestrator.cluster_locality import (
    Machine,
    Mount,
    Node,
    is_local_cluster,
    this_machine,
    unreachable_path_problems,
)
from orchestrator.spec import JobSpec

HERE = Machine(hostname="laptop", addresses=frozenset({"127.0.0.1", "::1", "192.168.1.20"}))
LOCAL_DISKS = [Mount("/", "ext4")]


def test_a_cluster_of_this_machine_alone_is_local():
    """Every alive node with this hostname and one of its addresses: local."""
    assert is_local_cluster([Node("laptop", "192.168.1.20"), Node("laptop", "127.0.0.1")], HERE)


def test_a_head_elsewhere_reached_through_localhost_is_remote():
    """A port-forwarded head reports its own hostname, even where its IP is loopback or one of ours; a cluster
    with one node elsewhere, or with no nodes listed, is not local either."""
    assert not is_local_cluster([Node("ray-head-7f9c", "10.244.0.12")], HERE)
    assert not is_local_cluster([Node("ray-head-7f9c", "127.0.0.1")], HERE)
    assert not is_local_cluster([Node("other-box", "192.168.1.20")], HERE)
    assert not is_local_cluster([Node("laptop", "192.168.1.20"), Node("gpu-worker-0", "10.0.0.5")], HERE)
    assert not is_local_cluster([], HERE)


def test_this_machine_is_named_by_its_hostname_and_interfaces():
    """This machine's identity includes the loopback address and its hostname."""
    machine = this_machine()
    assert "127.0.0.1" in machine.addresses and machine.hostname


def test_every_kind_of_local_path_is_refused_for_a_remote_cluster(tmp_path):
    """The default store and checkpoints, and local data files, tokenizer, dataset, cache and pretrained model,
    relative or absolute, each give one problem."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "tokenizer").mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-model"
    elsewhere.mkdir()
    spec = JobSpec.model_validate(
        {
            "model": {"init": "pretrained", "pretrained": str(elsewhere)},
            "data": {
                "source": "files",
                "files": ["corpus/*.jsonl"],
                "validation_files": [str(tmp_path / "corpus/a.jsonl")],
                "tokenizer": "tokenizer",
                "cache_dir": "cache",
            },
        }
    )
    problems = unreachable_path_problems(spec, tmp_path, LOCAL_DISKS)
    assert [problem.key for problem in problems] == [
        "tracking.uri",
        "checkpointing.storage_path",
        "data.files",
        "data.validation_files",
        "data.tokenizer",
        "data.cache_dir",
        "model.pretrained",
    ]
    images = JobSpec.model_validate(
        {
            "data": {"source": "mnist", "dataset": "corpus"},
            "tracking": {"uri": "file:///tmp/mlruns"},
            "checkpointing": {"storage_path": str(tmp_path / "checkpoints")},
        }
    )
    assert [problem.key for problem in unreachable_path_problems(images, tmp_path, LOCAL_DISKS)] == [
        "tracking.uri",
        "checkpointing.storage_path",
        "data.dataset",
    ]


def test_places_the_cluster_has_pass(tmp_path):
    """A tracking server, S3, hub names and absolute paths that this machine does not have are the cluster's."""
    spec = JobSpec.model_validate(
        {
            "model": {"init": "pretrained", "pretrained": "openai-community/gpt2"},
            "data": {
                "source": "files",
                "files": ["/mnt/xcm/corpus/*.jsonl"],
                "tokenizer": "gpt2",
                "cache_dir": "/mnt/xcm/data-cache",
            },
            "tracking": {"uri": "http://mlflow-host:5000", "artifact_location": "mlflow-artifacts:/xcm"},
            "checkpointing": {"storage_path": "s3://bucket/runs?endpoint_override=minio:9000"},
        }
    )
    assert unreachable_path_problems(spec, tmp_path, LOCAL_DISKS) == []
    mounted = spec.model_copy(
        update={"checkpointing": spec.checkpointing.model_copy(update={"storage_path": "/mnt/xcm/checkpoints"})}
    )
    assert unreachable_path_problems(mounted, tmp_path, LOCAL_DISKS) == []


def test_a_path_on_a_network_filesystem_may_be_the_clusters(tmp_path):
    """The same existing directory is this machine's on a local disk and passes on NFS, which nodes may mount."""
    spec = JobSpec.model_validate(
        {
            "tracking": {"uri": "http://mlflow-host:5000"},
            "checkpointing": {"storage_path": str(tmp_path / "checkpoints")},
        }
    )
    assert [problem.key for problem in unreachable_path_problems(spec, tmp_path, LOCAL_DISKS)] == [
        "checkpointing.storage_path"
    ]
    shared = [*LOCAL_DISKS, Mount(str(tmp_path), "nfs4")]
    assert unreachable_path_problems(spec, tmp_path, shared) == []


def test_a_pattern_that_walks_the_whole_machine_is_refused_not_walked(tmp_path, monkeypatch):
    """An absolute pattern still walking the filesystem after the data loader's limit gives one problem naming the
    key and the walk, instead of holding the submit for as long as the walk takes; the other keys are still
    checked."""
    from orchestrator.data import text_sources

    for index in range(3000):
        (tmp_path / "tree" / f"d{index // 100}" / f"e{index}").mkdir(parents=True)
    monkeypatch.setattr(text_sources, "PATTERN_WALK_LIMIT_S", 0.001)
    spec = JobSpec.model_validate(
        {
            "data": {"source": "files", "files": [str(tmp_path / "tree/**/x.txt")], "cache_dir": "cache"},
            "tracking": {"uri": "http://mlflow-host:5000"},
            "checkpointing": {"storage_path": "s3://bucket/runs"},
        }
    )
    problems = unreachable_path_problems(spec, tmp_path, LOCAL_DISKS)
    assert [problem.key for problem in problems] == ["data.files", "data.cache_dir"]
    assert "still walks the filesystem after 0.001 s" in problems[0].message
    assert "directory that holds the files" in problems[0].fix

"""Whether a Ray cluster runs on this machine, and which of a job's paths a cluster on other machines cannot see.

The address says nothing: ``http://127.0.0.1:8265`` is as often a ``kubectl port-forward`` or ``ray dashboard``
tunnel to a head far away as a head started here. So the cluster is asked for its alive nodes (the dashboard's
node summary, the one place Ray reports each node's hostname beside its IP), and it is local only when every
one of them is this machine: the same hostname and an IP address of one of this machine's interfaces. The
hostname matters because IPs repeat across private networks and a head may report a loopback address. A cluster
that cannot be asked is taken as remote, the safe side: at worst a job for a local cluster is refused with the
fix named, where this machine's paths sent to a remote cluster cost a job that fails there.

On a remote cluster, a path of the job is this machine's when it is relative (it starts at this machine's
working directory), or when it exists here or lies under the working directory, unless it is on a network
filesystem (NFS, CIFS, Ceph, Lustre...), which the cluster's nodes may mount at the same place. Any other
absolute path is taken as a place on the cluster's nodes (a shared volume such as ``/mnt/xcm``).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec, SpecProblem

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "afs",
        "ceph",
        "fuse.ceph",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.mountpoint-s3",
    }
)
# A head that just started answers the Jobs API a few seconds before its node appears in the summary.
_NODES_WAIT_S = 15.0


@dataclass(frozen=True)
class Node:
    """What a cluster says about one of its alive nodes."""

    hostname: str
    ip: str


@dataclass(frozen=True)
class Machine:
    """This machine as a cluster's node would name it: its hostname and the addresses of its interfaces."""

    hostname: str
    addresses: frozenset[str]


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str


def is_local_cluster(nodes: list[Node], here: Machine) -> bool:
    """True when the cluster has nodes and every one is this machine; a cluster of no nodes is unknown."""
    return bool(nodes) and all(node.hostname == here.hostname and node.ip in here.addresses for node in nodes)


def this_machine() -> Machine:
    """This machine's hostname, as Ray reports a node's, and the addresses of all its interfaces."""
    import psutil

    addresses = {
        address.address.split("%")[0]
        for entries in psutil.net_if_addrs().values()
        for address in entries
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }
    return Machine(hostname=socket.gethostname(), addresses=frozenset(addresses))


def alive_nodes(client) -> list[Node]:
    """The alive nodes of the cluster behind a Jobs API client (its token and headers), as its dashboard lists
    them; waits a few seconds for a head that has not listed itself yet."""
    deadline = time.monotonic() + _NODES_WAIT_S
    while True:
        response = client._do_request("GET", "/nodes?view=summary", timeout=10)
        response.raise_for_status()
        nodes = [
            Node(hostname=entry["hostname"], ip=entry["ip"])
            for entry in response.json()["data"]["summary"]
            if entry.get("raylet", {}).get("state") == "ALIVE"
        ]
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


def joined_cluster_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process has joined (``ray.init``), as Ray's GCS lists them."""
    import ray

    return [
        Node(hostname=node["NodeManagerHostname"], ip=node["NodeManagerAddress"])
        for node in ray.nodes()
        if node["Alive"]
    ]


def unreachable_path_problems(spec: JobSpec, workdir: Path, mounts: list[Mount] | None = None) -> list[SpecProblem]:
    """Every key of ``spec`` that names a place a remote cluster cannot see. A key left unset names this machine's
    default (the SQLite store, ``./xcm-runs/checkpoints``) except ``data.cache_dir``: an unset cache is made where
    the job runs."""
    from orchestrator.spec import SpecProblem

    mounts = this_machines_mounts() if mounts is None else mounts
    mine = _OnThisMachine(workdir.resolve(), mounts)
    problems = []

    def add(key: str, value: str, fix: str) -> None:
        problems.append(
            SpecProblem(key=key, message=f"{value} is on this machine, which the cluster's nodes cannot read", fix=fix)
        )

    uri = spec.tracking.uri
    if is_local_store(uri):
        add(
            "tracking.uri",
            uri or "the default SQLite store",
            "run the MLflow server in infra/mlflow and set tracking.uri: http://<host>:5000",
        )
    artifacts = spec.tracking.artifact_location
    if artifacts is not None and (artifacts.startswith("file:") or ("://" not in artifacts and ":/" not in artifacts)):
        add(
            "tracking.artifact_location",
            artifacts,
            "omit it (the tracking server stores artifacts), or use mlflow-artifacts:/NAME or s3://...",
        )
    storage = spec.checkpointing.storage_path
    if storage is None or ("://" not in storage and mine.path(storage)):
        add(
            "checkpointing.storage_path",
            storage or "the default ./xcm-runs/checkpoints",
            "set it to storage every node reaches: s3://bucket/xcm, or a volume every node mounts (infra/README.md)",
        )
    _add_data_problems(spec, mine, add, problems)
    model = spec.model
    if model.init == "pretrained" and model.pretrained and mine.existing(model.pretrained):
        add("model.pretrained", model.pretrained, "use a hub name, or a path that exists on the cluster's nodes")
    return problems


def is_local_store(tracking_uri: str | None) -> bool:
    """An MLflow store on this machine's disk (the default SQLite file, a file: URI or a path)."""
    if tracking_uri is None:
        return True
    return tracking_uri.startswith(("sqlite:", "file:")) or ("://" not in tracking_uri and tracking_uri != "databricks")


def _add_data_problems(spec: JobSpec, mine: _OnThisMachine, add, problems: list[SpecProblem]) -> None:
    from orchestrator.data.training_data import DataError
    from orchestrator.spec import SpecProblem

    data = spec.data
    for key in ("files", "validation_files"):
        try:
            local = next((pattern for pattern in getattr(data, key) if mine.pattern(pattern, f"data.{key}")), None)
        except DataError as error:  # a pattern that walks the whole machine: refused as the data loader does
            problems.append(SpecProblem(key=error.key, message=error.message, fix=error.fix))
            continue
        if local is not None:
            add(
                f"data.{key}",
                local,
                "copy the files to a volume every node mounts and list them there, or put them in a hub dataset",
            )
    if data.tokenizer and mine.existing(data.tokenizer):
        add("data.tokenizer", data.tokenizer, "use a hub name, or a path that exists on the cluster's nodes")
    if data.dataset and mine.existing(data.dataset):
        add("data.dataset", data.dataset, "use a hub dataset, or a directory that exists on the cluster's nodes")
    if data.cache_dir and mine.path(data.cache_dir):
        add(
            "data.cache_dir",
            data.cache_dir,
            "omit it (each node keeps its own cache where the job runs), or name a volume every node mounts",
        )


def this_machines_mounts() -> list[Mount]:
    """Every mounted filesystem here, with its type."""
    import psutil

    return [Mount(partition.mountpoint, partition.fstype) for partition in psutil.disk_partitions(all=True)]


@dataclass(frozen=True)
class _OnThisMachine:
    """Which paths are this machine's alone (see the module's docstring)."""

    workdir: Path
    mounts: list[Mount]

    def path(self, path: str) -> bool:
        """A path that is relative, or exists here or lies under the working directory, off network filesystems."""
        if not os.path.isabs(os.path.expanduser(path)):
            return True
        resolved = Path(os.path.expanduser(path)).resolve()
        if not (resolved.exists() or resolved.is_relative_to(self.workdir)):
            return False
        return self._filesystem(resolved) not in NETWORK_FILESYSTEMS

    def existing(self, name: str) -> bool:
        """A path (or a hub name) that exists here, relative to the working directory, off network filesystems."""
        resolved = (self.workdir / os.path.expanduser(name)).resolve()
        return resolved.exists() and self._filesystem(resolved) not in NETWORK_FILESYSTEMS

    def pattern(self, pattern: str, key: str) -> bool:
        """A glob pattern that is this machine's: relative, matching files here, or under the working directory.
        The walk is the data loader's, bounded in time (a DataError naming ``key`` past it): the job file is
        untrusted, and ``/**/x`` would walk every directory of this machine before the submit answered."""
        from orchestrator.data.text_sources import pattern_matches

        matches = pattern_matches(pattern, key) if os.path.isabs(pattern) else [pattern]
        return self.path(matches[0] if matches else pattern)

    def _filesystem(self, path: Path) -> str:
        """The type of the filesystem that holds ``path`` (or its nearest existing ancestor)."""
        while not path.exists() and path != path.parent:
            path = path.parent
        containing = [mount for mount in self.mounts if path.is_relative_to(mount.mountpoint)]
        return max(containing, key=lambda mount: len(mount.mountpoint)).fstype if containing else ""

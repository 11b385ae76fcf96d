"""Every kind of side job xcm knows: the driver starts the actors of those the spec enables, each rank builds
them, and the job checks ask each for its section's problems. A new side job adds its kind here."""

from __future__ import annotations

from typing import Any

from orchestrator.circuit_job.side_job import CIRCUITS
from orchestrator.partitioning.side_job import PARTITIONING
from orchestrator.side_jobs import SideJobKind
from orchestrator.spec import JobSpec

SIDE_JOBS: tuple[SideJobKind, ...] = (PARTITIONING, CIRCUITS)  # the partitioner first: circuits read its labels


def enabled_side_jobs(spec: JobSpec) -> list[SideJobKind]:
    return [kind for kind in SIDE_JOBS if kind.enabled(spec)]


def start_side_job_actors(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Driver: every enabled side job's actors, ``{kind name: {Ray name: handle}}``. When one kind fails to
    start, the actors already started are killed before the error goes on."""
    started: dict[str, dict[str, Any]] = {}
    try:
        for kind in enabled_side_jobs(spec):
            started[kind.name] = kind.start_actors(spec)
    except BaseException:
        stop_side_job_actors(started)
        raise
    return started


def stop_side_job_actors(started: dict[str, dict[str, Any]]) -> None:
    import ray

    for actors in started.values():
        for actor in actors.values():
            ray.kill(actor)

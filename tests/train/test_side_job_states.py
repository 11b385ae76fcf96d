"""Where checkpoints keep side jobs' states: one JSON file each, named by the side job, inside xcm/."""

import pytest

from orchestrator.train import checkpoint_store as store
from orchestrator.train.side_job_registry import SIDE_JOBS


def test_the_partitioner_keeps_the_file_earlier_checkpoints_have():
    """The partitioner's state stays xcm/partition.json, so checkpoints written before side jobs still resume."""
    assert store.side_job_file("partition") == store.PARTITION
    assert SIDE_JOBS[0].name == "partition"


@pytest.mark.parametrize("name", ["state", "config", "../partition", "a/b", "Partition", "", "rng-rank-0"])
def test_a_name_that_would_leave_its_place_or_overwrite_xcm_files_is_refused(name):
    """No side job's name can replace xcm's own files, climb out of xcm/ or collide with the RNG files."""
    with pytest.raises(ValueError, match="side job's name"):
        store.side_job_file(name)


def test_registered_side_jobs_have_distinct_usable_names():
    """Every registered kind maps to its own file."""
    files = [store.side_job_file(kind.name) for kind in SIDE_JOBS]
    assert len(set(files)) == len(files)

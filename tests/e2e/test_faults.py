"""The fault campaign of bench/faults.py, short and seeded: a run disturbed by killed processes, a corrupt
checkpoint, a tracking server outage and a full metric spool ends as the undisturbed run does."""

import json

import pytest

from bench.faults import campaign, stray_checkpoints
from orchestrator.train import checkpoint_store as store

FAULTS = ["partitioner", "mlflow", "spool", "driver", "corrupt"]


def test_the_final_check_finds_every_checkpoint_left_outside_the_run(tmp_path, checkpoint_files):
    """The campaign's checkpoint check passes a run directory holding exactly Ray's list, intact, and names a
    checkpoint Ray's list does not name, one that does not verify, and a quarantine or branch a resume left."""
    for step in (20, 30):
        checkpoint_files.write(tmp_path, step)
    names = [store.checkpoint_name(step) for step in (20, 30)]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": name} for name in names]}
    (tmp_path / store.RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    assert stray_checkpoints(tmp_path) == []
    checkpoint_files.write(tmp_path, 10)
    (tmp_path / f"{store.REFUSED_PREFIX}20261206T000000Z").mkdir()
    (tmp_path / f"{store.SUPERSEDED_PREFIX}20261206T000000Z").mkdir()
    (tmp_path / "step-00000030" / store.MANIFEST).unlink()
    assert stray_checkpoints(tmp_path) == [
        "step-00000010: not in Ray Train's list",
        "step-00000030: no manifest (the save or upload did not finish)",
        f"{store.REFUSED_PREFIX}20261206T000000Z: set aside and left",
        f"{store.SUPERSEDED_PREFIX}20261206T000000Z: set aside and left",
    ]


@pytest.mark.slow
def test_faulted_run_ends_like_the_undisturbed_one(tmp_path):
    """Every fault is injected and survived: no step logged twice, none lost but the ones the full spool dropped
    and counted, each recovered; the final weights and loss curve equal the undisturbed run's, both runs FINISHED,
    no Ray process left, every checkpoint directory listed by Ray Train and intact, none set aside left."""
    report = campaign(tmp_path, seed=1, faults=FAULTS, steps=160, outage_s=8)
    print(report.table())
    assert sorted(i.fault for i in report.injections) == sorted(FAULTS)
    for injection in report.injections:
        assert not injection.problems, (injection.label, injection.problems)
        assert injection.recovery_s is not None and not injection.duplicated, injection.label
        assert bool(injection.lost) == (injection.fault == "spool"), (injection.label, sorted(injection.lost))
    failed = {name: detail for name, (ok, detail) in report.invariants.items() if not ok}
    assert not failed, failed

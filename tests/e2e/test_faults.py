"""The fault campaign of bench/faults.py, short and seeded: a run disturbed by killed processes, a corrupt
checkpoint, a tracking server outage and a full metric spool ends as the undisturbed run does."""

import pytest

from bench.faults import campaign

FAULTS = ["partitioner", "mlflow", "spool", "driver", "corrupt"]


@pytest.mark.slow
def test_faulted_run_ends_like_the_undisturbed_one(tmp_path):
    """Every fault is injected and survived: no step logged twice, none lost but the ones the full spool dropped
    and counted, each recovered; the final weights and loss curve equal the undisturbed run's, both runs FINISHED,
    no Ray process left, every checkpoint directory listed by Ray Train and intact."""
    report = campaign(tmp_path, seed=1, faults=FAULTS, steps=160, outage_s=8)
    print(report.table())
    assert sorted(i.fault for i in report.injections) == sorted(FAULTS)
    for injection in report.injections:
        assert not injection.problems, (injection.label, injection.problems)
        assert injection.recovery_s is not None and not injection.duplicated, injection.label
        assert bool(injection.lost) == (injection.fault == "spool"), (injection.label, sorted(injection.lost))
    failed = {name: detail for name, (ok, detail) in report.invariants.items() if not ok}
    assert not failed, failed

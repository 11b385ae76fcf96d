"""The one "is it due" rule that logging, evaluation, memory, reports and checkpoints share."""

from orchestrator.train.due import due


def steps_due(steps: int, every: int, first: bool = False) -> list[int]:
    return [step for step in range(steps) if due(step, every, last_step=steps - 1, first=first)]


def test_every_nth_completed_step_and_the_last():
    """Every 4 steps of 10: after the 4th and 8th completed steps (indices 3, 7) and after the last."""
    assert steps_due(10, 4) == [3, 7, 9]


def test_first_adds_the_step_a_run_starts_from():
    """The training metrics also log step 0, once, and every step when N is 1."""
    assert steps_due(10, 4, first=True) == [0, 3, 7, 9]
    assert steps_due(5, 1, first=True) == steps_due(5, 1) == [0, 1, 2, 3, 4]


def test_zero_means_only_at_the_end():
    """every=0 (checkpoints' "only at the end") is due at the last step alone."""
    assert steps_due(10, 0) == [9]

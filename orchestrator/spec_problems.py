"""What a job that does not load reports: every problem at once, one line each.

Separate from the schema (``orchestrator.spec``) so that whatever checks a spec can report with it without
importing the schema: ``credentials`` does, and the schema uses ``credentials``.
"""

from __future__ import annotations

from pydantic import BaseModel

SHOWN_CHARACTERS = 120  # of a value or key quoted in an error line


class SpecProblem(BaseModel):
    key: str
    message: str
    fix: str
    line: int | None = None


class SpecError(ValueError):
    """Every problem of a job file, reported at once: one line each, ``file:line: key: problem. Fix: fix``."""

    def __init__(self, source: str, problems: list[SpecProblem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(_problem_line(source, problem) for problem in problems))


def _problem_line(source: str, problem: SpecProblem) -> str:
    where = f"{source}:{problem.line}" if problem.line else source
    key = problem.key if len(problem.key) <= SHOWN_CHARACTERS else problem.key[:SHOWN_CHARACTERS] + "...(cut)"
    return _printable(f"{where}: {key}: {problem.message}. Fix: {problem.fix}")


def _printable(text: str) -> str:
    """One terminal line whatever a hostile file holds: control characters (a newline in a key could forge
    another error line, an escape sequence rewrite the terminal) are shown escaped."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)

"""The model section's own checks, run with every spec load (``orchestrator.train.job_checks``)."""

from __future__ import annotations

from orchestrator.spec import ModelSpec, SpecProblem


def model_spec_problems(model: ModelSpec) -> list[SpecProblem]:
    """A pretrained start needs a model to start from."""
    if model.init == "pretrained" and not model.pretrained:
        return [
            SpecProblem(
                key="model.pretrained",
                message="init is 'pretrained' but no model is named",
                fix="set model.pretrained to a local path or hub name, or init: random",
            )
        ]
    return []

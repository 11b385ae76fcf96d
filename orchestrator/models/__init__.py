"""Model families: build a model from the spec's ``model`` section."""

from orchestrator.models.dimensions import ModelDimensions
from orchestrator.models.registry import build_model, model_config, model_dimensions

__all__ = ["ModelDimensions", "build_model", "model_config", "model_dimensions"]

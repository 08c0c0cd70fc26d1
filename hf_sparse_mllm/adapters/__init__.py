"""Per-architecture knowledge for compressed training and inference, registered by `config.model_type`."""

from .base import (
    ArchitectureAdapter,
    PlaceholderRun,
    VisualLayout,
    VisualUnit,
    get_adapter,
    has_adapter,
    register_adapter,
    square_grid,
    supported_model_types,
    whole_run_units,
)
from .llava import LlavaAdapter

__all__ = [
    "ArchitectureAdapter",
    "LlavaAdapter",
    "PlaceholderRun",
    "VisualLayout",
    "VisualUnit",
    "get_adapter",
    "has_adapter",
    "register_adapter",
    "square_grid",
    "supported_model_types",
    "whole_run_units",
]

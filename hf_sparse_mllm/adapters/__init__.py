"""Per-architecture knowledge, registered by `config.model_type`."""

from .base import (
    ArchitectureAdapter,
    SparsePlan,
    get_adapter,
    register_adapter,
    shrink_image_spans,
    supported_model_types,
)
from .llava import LlavaAdapter

__all__ = [
    "ArchitectureAdapter",
    "LlavaAdapter",
    "SparsePlan",
    "get_adapter",
    "register_adapter",
    "shrink_image_spans",
    "supported_model_types",
]

"""Per-architecture knowledge for compressed training and inference, registered by `config.model_type`."""

from .aya_vision import AyaVisionAdapter
from .base import (
    ArchitectureAdapter,
    PlaceholderRun,
    VisualLayout,
    VisualUnit,
    adapter_class,
    get_adapter,
    has_adapter,
    register_adapter,
    square_grid,
    supported_model_types,
    whole_run_units,
)
from .gemma3 import Gemma3Adapter
from .gemma4 import Gemma4Adapter
from .idefics3 import Idefics3Adapter, PerTileAdapter
from .internvl import InternVLAdapter
from .lfm2_vl import Lfm2VlAdapter
from .llava import FixedGridAdapter, LlavaAdapter, VipLlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .mistral3 import Mistral3Adapter
from .paligemma import PaliGemmaAdapter
from .qwen_vl import Glm4vAdapter, Qwen3VLAdapter, QwenVLAdapter

__all__ = [
    "ArchitectureAdapter",
    "AyaVisionAdapter",
    "FixedGridAdapter",
    "Gemma3Adapter",
    "Gemma4Adapter",
    "Glm4vAdapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "Lfm2VlAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Mistral3Adapter",
    "PaliGemmaAdapter",
    "PerTileAdapter",
    "PlaceholderRun",
    "Qwen3VLAdapter",
    "QwenVLAdapter",
    "VipLlavaAdapter",
    "VisualLayout",
    "VisualUnit",
    "adapter_class",
    "get_adapter",
    "has_adapter",
    "register_adapter",
    "square_grid",
    "supported_model_types",
    "whole_run_units",
]

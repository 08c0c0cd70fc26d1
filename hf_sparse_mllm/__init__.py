"""Sparse training for vision-language models in the Hugging Face ecosystem."""

from transformers import AutoConfig

from ._version import __version__
from .config import SPARSE_CONFIG_NAME, SparseMLLMConfig
from .trainer import SparseMLLMTrainer

AutoConfig.register(SparseMLLMConfig.model_type, SparseMLLMConfig, exist_ok=True)

__all__ = ["SPARSE_CONFIG_NAME", "SparseMLLMConfig", "SparseMLLMTrainer", "__version__"]

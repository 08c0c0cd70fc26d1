"""Sparse training for vision-language models in the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from transformers import AutoConfig

from .config import SPARSE_CONFIG_NAME, SparseMLLMConfig
from .trainer import SparseMLLMTrainer

AutoConfig.register(SparseMLLMConfig.model_type, SparseMLLMConfig, exist_ok=True)

__all__ = ["SPARSE_CONFIG_NAME", "SparseMLLMConfig", "SparseMLLMTrainer", "__version__"]

"""Sparse training for vision-language models in the Hugging Face ecosystem."""

from transformers import AutoConfig

from ._version import __version__
from .config import SPARSE_CONFIG_NAME, SparseMLLMConfig
from .trainer import SparseMLLMTrainer

AutoConfig.register(SparseMLLMConfig.model_type, SparseMLLMConfig, exist_ok=True)

__all__ = ["SPARSE_CONFIG_NAME", "SparseMLLMConfig", "SparseMLLMTrainer", "SparseSFTTrainer", "__version__"]


def __getattr__(name: str):
    # Imported on first use: the package itself must import without `trl` (e.g. on a GPU box with only torch and
    # transformers), and `SparseSFTTrainer` subclasses TRL's `SFTTrainer`.
    if name == "SparseSFTTrainer":
        from .sft import SparseSFTTrainer

        return SparseSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

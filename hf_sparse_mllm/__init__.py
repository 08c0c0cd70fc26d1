"""Sparse training for vision-language models in the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

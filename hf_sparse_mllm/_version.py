"""The package version, in a module of its own so that modules below `hf_sparse_mllm/__init__.py` can import it
without running the package `__init__` (which imports the trainer)."""

__version__ = "0.1.0.dev0"

"""`python -m hf_sparse_mllm`: the `hf-sparse-mllm` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

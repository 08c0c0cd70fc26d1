"""The `hf-sparse-mllm` command line (also `python -m hf_sparse_mllm`): `train`, `eval` and `analyze`.

    hf-sparse-mllm train --model_name_or_path M --dataset_name D --output_dir O --token_compressor divprune
    hf-sparse-mllm eval --model_path O --tasks conversational=test.jsonl --modes full divprune@0.25
    hf-sparse-mllm analyze --model O --dataset D

Each command parses its own flags (`hf-sparse-mllm <command> --help`); `train` also reads a `--config recipe.yaml`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._version import __version__
from .arguments import SparseArguments

# name: (module with `main(argv)`, one-line help). Modules are imported only for the command that runs.
COMMANDS = {
    "train": (
        "hf_sparse_mllm.cli.train",
        "Fine-tune a vision-language model with sparse training (TRL's SFTTrainer).",
    ),
    "eval": ("hf_sparse_mllm.cli.eval", "Evaluate a saved model on lmms-eval-style tasks, full and compressed."),
    "analyze": ("hf_sparse_mllm.cli.analyze", "Measure layer and visual-token redundancy of a model on a dataset."),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-sparse-mllm",
        description="Sparse training for vision-language models: train, evaluate, analyse.",
        epilog="Run `hf-sparse-mllm <command> --help` for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=f"hf-sparse-mllm {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        # The command's own parser reads everything after its name, `--help` included.
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-sparse-mllm` with `argv` (defaults to `sys.argv[1:]`); returns the exit status.

    Example:

    ```python
    >>> from hf_sparse_mllm.cli import main
    >>> main(["--version"])
    Traceback (most recent call last):
    ...
    SystemExit: 0

    ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(argv[1:])


__all__ = ["COMMANDS", "SparseArguments", "main"]

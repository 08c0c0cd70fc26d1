"""`SparseArguments`: the fields of [`SparseMLLMConfig`] as command-line flags beside TRL's `SFTConfig`.

`SFTConfig` (a `TrainingArguments`) and `SparseMLLMConfig` both have a `seed` field, and one argument parser cannot
hold two `--seed` flags. `SparseArguments` is `SparseMLLMConfig`'s fields, built from them (so their types, defaults
and help strings stay the config's), with `seed` renamed `sparse_seed`, which defaults to the training `--seed`, and
without the fields the package writes itself (`PACKAGE_FIELDS`: `sparse_mllm_version`, `resume_note`). Its values are checked when
[`~SparseArguments.to_config`] builds the config.
"""

from __future__ import annotations

import dataclasses
from difflib import get_close_matches
from typing import get_type_hints

from ..config import SparseMLLMConfig

_RENAMED = {"seed": "sparse_seed"}
# Written by the package (the version, the trainer's note on a resumed run), never chosen by the user.
PACKAGE_FIELDS = ("sparse_mllm_version", "resume_note")


def _fields() -> list[tuple]:
    hints = get_type_hints(SparseMLLMConfig)  # plain types: the parser reads no `Annotated` constraints
    specs = []
    for f in dataclasses.fields(SparseMLLMConfig):
        if f.name in PACKAGE_FIELDS:
            continue
        if f.name in _RENAMED:
            help_text = f"{f.metadata['help']} Defaults to --seed (the training seed)."
            specs.append(
                (_RENAMED[f.name], hints[f.name] | None, dataclasses.field(default=None, metadata={"help": help_text}))
            )
        else:
            specs.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata)))
    return specs


def _to_config(self, seed: int | None = None) -> SparseMLLMConfig:
    """The [`SparseMLLMConfig`] of these arguments; `seed` (the training seed) is its seed unless `sparse_seed` is
    set. Raises the config's `ValueError` (naming the field, what it accepts and the value) for a bad value."""
    values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in _RENAMED.values()}
    sparse_seed = self.sparse_seed if self.sparse_seed is not None else seed
    if sparse_seed is not None:
        values["seed"] = sparse_seed
    return SparseMLLMConfig(**values)


SparseArguments = dataclasses.make_dataclass(
    "SparseArguments",
    _fields(),
    namespace={"to_config": _to_config, "_argument_group_name": "sparse training (hf_sparse_mllm.SparseMLLMConfig)"},
    kw_only=True,
)
SparseArguments.__module__ = __name__  # for pickling (`make_dataclass` takes `module=` only from Python 3.12)
SparseArguments.__doc__ = """
    [`SparseMLLMConfig`]'s fields as `HfArgumentParser` / `TrlParser` flags, with `seed` named `sparse_seed` (it
    defaults to the training `--seed`) and without the fields the package writes (`PACKAGE_FIELDS`).

    Example:

    ```python
    >>> from trl import TrlParser
    >>> from hf_sparse_mllm.cli import SparseArguments
    >>> (args,) = TrlParser(SparseArguments).parse_args_and_config(["--keep_ratio", "0.1", "--layer_skip_policy", "stochastic"])
    >>> config = args.to_config(seed=7)
    >>> config.keep_ratio, config.layer_skip_policy, config.seed
    (0.1, 'stochastic', 7)

    ```
"""


def parse_or_exit(parser, argv=None) -> list:
    """The dataclasses `parser` (a `trl.TrlParser`) reads from `argv` and an optional `--config` YAML file.

    Anything it cannot take exits with argparse's usage error (status 2) naming it: an unknown flag or YAML key (with
    the closest known flag), a value a dataclass rejects (its own `ValueError`).
    """
    try:
        *parsed, from_config, from_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as error:  # the dataclasses' own checks, e.g. SFTConfig's
        parser.error(str(error))
    known = sorted({option for action in parser._actions for option in action.option_strings})

    def hints(strings: list[str]) -> str:
        close = [(s, m[0]) for s in strings if s.startswith("--") and (m := get_close_matches(s, known, n=1))]
        return "".join(f" ({s}: did you mean {match}?)" for s, match in close)

    if from_config:
        flags = from_config[::2]  # TrlParser hands unknown YAML keys back as flag, value pairs
        keys = ", ".join(flag.removeprefix("--") for flag in flags)
        parser.error(f"unknown keys in the --config file: {keys}{hints(flags)}")
    if from_flags:
        parser.error(f"unrecognized arguments: {' '.join(from_flags)}{hints(from_flags)}")
    return parsed


__all__ = ["PACKAGE_FIELDS", "SparseArguments", "parse_or_exit"]

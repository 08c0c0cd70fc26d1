"""Names checked against the ones a registry or a signature knows: a taken name is refused with what to do instead,
an unknown one is answered with the closest known name."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from difflib import get_close_matches
from typing import Any


def refuse_taken(
    registry: Mapping[str, Any], name: str, newcomer: Any, *, kind: str, decorator: str, remedy: str | None = None
) -> None:
    """
    Raise a `ValueError` if `name` is already in `registry`, naming what holds it and what to do instead (by
    default: register `newcomer` under another name with `@decorator`).

    Example:

    ```python
    >>> from hf_sparse_mllm._names import refuse_taken
    >>> def ours(): ...
    >>> def yours(): ...
    >>> refuse_taken({"docs": ours}, "docs", yours, kind="Docs name", decorator="register_docs")
    Traceback (most recent call last):
    ...
    ValueError: Docs name 'docs' is already taken by ours; register yours under another name, e.g. @register_docs('docs_custom').

    ```
    """
    if name in registry:
        remedy = remedy or f"register {_label(newcomer)} under another name, e.g. @{decorator}({name + '_custom'!r})."
        raise ValueError(f"{kind} {name!r} is already taken by {_label(registry[name])}; {remedy}")


def _label(value: Any) -> str:
    # Registries hold classes, functions, or instances of the decorated class.
    return getattr(value, "__name__", None) or type(value).__name__


def did_you_mean(unknown: Iterable[str], known: Collection[str]) -> str:
    """
    The `unknown` names, comma-separated, each followed by the closest of `known` where one is close.

    Example:

    ```python
    >>> from hf_sparse_mllm._names import did_you_mean
    >>> did_you_mean(["keep_ration", "colour"], ["keep_ratio", "num_keep"])
    "'keep_ration' (did you mean 'keep_ratio'?), 'colour'"

    ```
    """
    return ", ".join(
        f"{name!r} (did you mean {match[0]!r}?)" if (match := get_close_matches(name, known, n=1)) else repr(name)
        for name in unknown
    )

"""Registry of the tiny model families: one builder per `model_type`, each returning a matching model and processor."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable

from transformers import PreTrainedModel, ProcessorMixin

from .._names import did_you_mean, refuse_taken

TinyBuilder = Callable[..., tuple[PreTrainedModel, ProcessorMixin]]

_FAMILIES: dict[str, TinyBuilder] = {}


def register_tiny_family(family: str) -> Callable[[TinyBuilder], TinyBuilder]:
    """
    Function decorator that registers a tiny builder under `family` (the model's `model_type`).

    A builder takes keyword-only `words`, `seed` and `padding_side` (plus any shape arguments of its own) and returns
    `(model, processor)`. Unknown names passed to [`build_tiny_model_and_processor`] are refused from the builder's
    signature; a builder that takes `**kwargs` (as the built-in ones do, `Unpack`ing a `TypedDict` checked by
    `TinyBuild.of`) must check its own.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor, list_tiny_families, register_tiny_family
    >>> @register_tiny_family("docs_llava")
    ... def build_docs_llava(*, words, seed=0, padding_side="right"):
    ...     return build_tiny_llava_and_processor("test", words=words, seed=seed, padding_side=padding_side)
    >>> "docs_llava" in list_tiny_families()
    True
    ```
    """

    def decorator(builder: TinyBuilder) -> TinyBuilder:
        refuse_taken(_FAMILIES, family, builder, kind="Tiny family", decorator="register_tiny_family")
        _FAMILIES[family] = builder
        return builder

    return decorator


def list_tiny_families() -> list[str]:
    """Sorted names of the registered tiny families (`model_type`s), e.g. `["gemma3", "idefics3", "llava", ...]`."""
    return sorted(_FAMILIES)


def check_overrides(family: str, overrides: Iterable[str], accepted: Collection[str]) -> None:
    """Raise a `TypeError` naming the `overrides` of tiny family `family` not `accepted`, each with the closest one."""
    unknown = [name for name in overrides if name not in accepted]
    if unknown:
        allowed = sorted(accepted)
        raise TypeError(
            f"Unknown overrides for tiny family {family!r}: {did_you_mean(unknown, allowed)}; allowed: {allowed}."
        )


def _check_overrides(family: str, builder: TinyBuilder, overrides: Iterable[str]) -> None:
    parameters = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # the builder checks its own keyword arguments (this package's, in `TinyBuild.of`)
    check_overrides(family, overrides, set(parameters) - {"words", "seed", "padding_side"})


def build_tiny_model_and_processor(
    family: str, *, words: Iterable[str], seed: int = 0, padding_side: str = "right", **overrides
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """
    Build a tiny randomly initialised `*ForConditionalGeneration` model of `family` and its processor, offline.

    The model is in float32 and eval mode, uses SDPA attention, and its weights depend only on `seed`. The processor
    has a word-level tokenizer over `words` plus the family's special tokens, the family's PIL image processor and a
    chat template in TRL's conversational format whose assistant turns are marked for
    `return_assistant_tokens_mask=True`.

    Every family's builder takes the arguments below: `words`, `seed`, `padding_side`, and, through `overrides`, the
    widths, depths and attention implementation (the defaults given are every family's but `llava`'s, see
    [`build_tiny_llava`]); a builder takes them as `**kwargs` that unpack its family's `TypedDict` (`TinyBuilderKwargs`
    plus its image geometry). The builders document only their own arguments, the image geometry of their family
    (e.g. [`build_tiny_qwen2_vl`]).

    Args:
        family (`str`):
            A registered family (`model_type`), see [`list_tiny_families`].
        words (`Iterable[str]`):
            Vocabulary words, see [`build_word_tokenizer`].
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation; the global RNG state is restored afterwards.
        padding_side (`str`, *optional*, defaults to `"right"`):
            Padding side of the tokenizer (`"left"` for batched generation).
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the decoder.
        intermediate_size (`int`, *optional*, defaults to `64`):
            MLP width of the decoder.
        num_hidden_layers (`int`, *optional*, defaults to `2`):
            Decoder layers.
        num_attention_heads (`int`, *optional*, defaults to `2`):
            Attention heads of the decoder and the vision tower.
        vision_hidden_size (`int`, *optional*, defaults to `32`):
            Width of the vision tower (its MLP is 2x wider).
        vision_layers (`int`, *optional*, defaults to `2`):
            Vision encoder layers.
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`):
            Attention implementation of both towers (`"sdpa"` or `"eager"`).
        **overrides:
            Keyword arguments of the family's builder: the widths above, or its own, e.g. `patch_size=4`.

    Returns:
        `tuple[PreTrainedModel, ProcessorMixin]`: the model (float32, eval mode) and its processor.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor
    >>> model, processor = build_tiny_model_and_processor("llava", words=["what", "color", "red"], hidden_size=32)
    >>> model.config.model_type, model.config.text_config.hidden_size
    ('llava', 32)
    ```
    """
    if family not in _FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {list_tiny_families()}.")
    builder = _FAMILIES[family]
    _check_overrides(family, builder, overrides)
    return builder(words=words, seed=seed, padding_side=padding_side, **overrides)

"""Helpers shared by the tiny family builders: the keyword arguments they share and the steps of a build they share,
processor registration."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import torch
from transformers import (
    AutoProcessor,
    BaseImageProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from .registry import check_overrides
from .tokenizer import IMAGE_TOKEN, build_word_tokenizer, make_chat_template

# The builders' `**kwargs: Unpack[...]` annotations resolve at run time too (`typing.get_type_hints`, doc tools).
if sys.version_info >= (3, 11):
    from typing import Unpack as Unpack
else:
    from typing_extensions import Unpack as Unpack


class TinyShape(TypedDict, total=False):
    """
    The widths and depths every family builder takes (`TinyBuild.text_config` and `vision_config` set them), a
    `TypedDict` so that `TinyBuilderKwargs` can extend it.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vision_hidden_size: int
    vision_layers: int


class TinyBuilderKwargs(TinyShape, total=False):
    """
    The keyword arguments every family builder takes besides `words`, described once, with their defaults, in
    `build_tiny_model_and_processor`. A family's own `TypedDict` adds its image geometry.
    """

    seed: int
    padding_side: str
    attn_implementation: str


class SquareImageBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of a builder whose images are resized to one square (PaliGemma, VipLLaVA): every
    builder's, `image_size` and `patch_size`."""

    image_size: int
    patch_size: int


# Every family's widths and depths but LLaVA's (`build_tiny_llava` has its own).
DEFAULT_SHAPE: TinyShape = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vision_hidden_size": 32,
    "vision_layers": 2,
}


@dataclass(frozen=True)
class TinyBuild:
    """
    The `TinyBuilderKwargs` of one builder call, with their defaults, and the steps of a build every family shares.
    `shape` holds all six widths and depths.
    """

    shape: TinyShape
    seed: int = 0
    padding_side: str = "right"
    attn_implementation: str = "sdpa"

    @classmethod
    def of(cls, family: str, kwargs: Mapping[str, Any], kwargs_type: type[TinyBuilderKwargs]) -> TinyBuild:
        """
        The `TinyBuilderKwargs` among the `**kwargs` of `family`'s builder, with their defaults, once every name in
        `kwargs` is checked to be a key of `kwargs_type`, the family's `TypedDict` (the builder reads its geometry).
        """
        check_overrides(family, kwargs, kwargs_type.__annotations__)
        shape = {name: kwargs.get(name, default) for name, default in DEFAULT_SHAPE.items()}
        return cls(shape, **{field.name: kwargs[field.name] for field in fields(cls) if field.name in kwargs})

    def tokenizer(
        self, words: Iterable[str], image_placeholder: str = IMAGE_TOKEN, *, bos: bool = True, **kwargs: Any
    ) -> PreTrainedTokenizerFast:
        """
        The word tokenizer over `words` (`kwargs` are more arguments of `build_word_tokenizer`) with `padding_side`
        and the chat template that writes `image_placeholder` for an image (`bos`: see `make_chat_template`).
        """
        chat_template = make_chat_template(image_placeholder, bos=bos)
        return build_word_tokenizer(words, chat_template=chat_template, padding_side=self.padding_side, **kwargs)

    @staticmethod
    def processor(
        processor_class: type[ProcessorMixin],
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        **kwargs: Any,
    ) -> ProcessorMixin:
        """`processor_class` over `image_processor` and `tokenizer`, with the tokenizer's chat template."""
        return processor_class(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template, **kwargs
        )

    def text_config(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The fields every tiny decoder config shares: widths, vocabulary size and special token ids."""
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=self.shape["hidden_size"],
            intermediate_size=self.shape["intermediate_size"],
            num_hidden_layers=self.shape["num_hidden_layers"],
            num_attention_heads=self.shape["num_attention_heads"],
            num_key_value_heads=self.shape["num_attention_heads"],
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )

    def vision_config(self, *, image_size: Any, patch_size: Any, mlp_ratio: int = 2) -> dict[str, Any]:
        """The fields of a ViT-style tower (CLIP, SigLIP, Idefics3's, InternViT) with the decoder's head count."""
        return dict(
            hidden_size=self.shape["vision_hidden_size"],
            intermediate_size=mlp_ratio * self.shape["vision_hidden_size"],
            num_hidden_layers=self.shape["vision_layers"],
            num_attention_heads=self.shape["num_attention_heads"],
            image_size=image_size,
            patch_size=patch_size,
        )

    def model(
        self, model_class: type[PreTrainedModel], config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase
    ) -> PreTrainedModel:
        """
        Instantiate `model_class(config)` with weights that depend only on `seed`, in float32 and eval mode.

        The generation config gets the tokenizer's pad/bos/eos ids so `generate` stops at `</s>` and pads with
        `<pad>`.
        """
        config._attn_implementation = self.attn_implementation
        # A private generator state keeps the weights a pure function of `seed` without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = model_class(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.float().eval()


def check_patch_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(f"patch_size must divide image_size, got image_size={image_size}, patch_size={patch_size}")


def register_processor(processor_class: type) -> type:
    """
    Class decorator that makes `AutoProcessor.from_pretrained` find `processor_class` by the name saved in
    `processor_config.json`, in any process that imported `hf_sparse_mllm.tiny`.

    Used for the image-only subclasses of processors that hold a video processor (Qwen2-VL, LLaVA-OneVision,
    SmolVLM, InternVL...). In `transformers` 5 every video processor is torchvision-backed, and a processor whose
    `__init__` names a `video_processor` can neither be built without torchvision (its argument check looks the
    video base class up and fails) nor loaded by `AutoProcessor` (which loads every sub-processor its `__init__`
    names). `ProcessorMixin` reads the sub-processors, and the settings it saves and reloads, from the `__init__`
    signature, so a subclass whose `__init__` repeats the parent's without `video_processor` is a complete image and
    text processor: it saves, reloads and processes images exactly like its parent (calls with `videos=` are not
    supported). It is registered under a string key rather than the model's config class, so `AutoProcessor` still
    maps real checkpoints of that model type to the stock processor.
    """
    AutoProcessor.register(f"hf_sparse_mllm.tiny.{processor_class.__name__}", processor_class, exist_ok=True)
    return processor_class

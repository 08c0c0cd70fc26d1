"""Helpers shared by the tiny family builders: the shared widths and depths, seeded initialisation, processor
registration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import AutoProcessor, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyShape:
    """
    The widths and depths every family builder takes (described once, in `build_tiny_model_and_processor`), and the
    config fields they set.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vision_hidden_size: int
    vision_layers: int

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> TinyShape:
        """The shape among a builder's arguments (its `locals()`)."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})

    def text_config(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The fields every tiny decoder config shares: widths, vocabulary size and special token ids."""
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )

    def vision_config(self, *, image_size: Any, patch_size: Any, mlp_ratio: int = 2) -> dict[str, Any]:
        """The fields of a ViT-style tower (CLIP, SigLIP, Idefics3's, InternViT) with the decoder's head count."""
        return dict(
            hidden_size=self.vision_hidden_size,
            intermediate_size=mlp_ratio * self.vision_hidden_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=image_size,
            patch_size=patch_size,
        )


def check_patch_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(f"patch_size must divide image_size, got image_size={image_size}, patch_size={patch_size}")


def init_tiny_model(
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    attn_implementation: str,
) -> PreTrainedModel:
    """
    Instantiate `model_class(config)` with weights that depend only on `seed`, in float32 and eval mode.

    The generation config gets the tokenizer's pad/bos/eos ids so `generate` stops at `</s>` and pads with `<pad>`.
    """
    config._attn_implementation = attn_implementation
    # A private generator state keeps the weights a pure function of `seed` without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float().eval()


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

"""Helpers shared by the tiny family builders: seeded initialisation, text config fields, processor registration."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def text_config_kwargs(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
) -> dict[str, Any]:
    """The fields every tiny decoder config shares: widths, vocabulary size and special token ids."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


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

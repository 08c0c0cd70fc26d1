"""Helpers shared by the tiny family builders: seeded initialisation and processors without a video processor."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


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


class ImageOnlyProcessorMixin:
    """
    Drops the video processor from a processor class that has one (Qwen2-VL, LLaVA-OneVision, SmolVLM, InternVL...).

    In `transformers` 5 every video processor is torchvision-backed, and a processor whose `__init__` names a
    `video_processor` can neither be built (its argument check looks the video base class up, which fails without
    torchvision) nor loaded by `AutoProcessor` (which loads every sub-processor of the signature). `ProcessorMixin`
    reads the sub-processors from the `__init__` signature, so a subclass whose `__init__` has only `image_processor`
    and `tokenizer` is a complete image-and-text processor: it saves, reloads and processes images exactly like the
    parent class. Its calls with `videos=` are not supported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def register_processor(processor_class: type) -> type:
    """
    Class decorator that makes `AutoProcessor.from_pretrained` find `processor_class` by the name saved in
    `processor_config.json` (in any process that imported `hf_sparse_mllm.tiny`).

    It is registered under a string key rather than the model's config class, so `AutoProcessor` still maps real
    checkpoints of that model type to the stock processor.
    """
    AutoProcessor.register(f"hf_sparse_mllm.tiny.{processor_class.__name__}", processor_class, exist_ok=True)
    return processor_class

"""Tiny LLaVA-1.5 (`llava`): CLIP-style vision tower, Llama decoder, one run of `<image>` tokens per image.

The image processor is [`~transformers.CLIPImageProcessorPil`] (CLIP's PIL backend; `CLIPImageProcessor` is the
`torchvision` one in `transformers` 5). Every image is resized and center-cropped to one square, so the number of
visual tokens is fixed: `(image_size // patch_size) ** 2` (16 with the `"test"` preset), one more with the `"full"`
feature-selection strategy. `get_image_features(...).pooler_output` is a list with one `(tokens, hidden)` tensor per
image; the processor returns `input_ids`, `attention_mask` and `pixel_values` `(images, 3, size, size)`.

```python
>>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
>>> model, processor = build_tiny_llava_and_processor("test", words=["what", "color", "red"])
>>> model.config.image_seq_length
16
```
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ._common import TinyBuild, TinyShape, check_patch_size
from .registry import register_tiny_family
from .tokenizer import IMAGE_TOKEN, build_word_tokenizer


def build_tiny_processor(
    words: Iterable[str],
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_feature_select_strategy: str = "default",
    padding_side: str = "right",
) -> LlavaProcessor:
    """
    Build a [`~transformers.LlavaProcessor`] from a word list, offline and without `torchvision`.

    The image processor is [`~transformers.CLIPImageProcessorPil`] (CLIP's PIL backend: `CLIPImageProcessor` is the
    `torchvision` backend in `transformers` 5). Images are resized and center-cropped to `image_size`, and each
    `<image>` in the text expands to `(image_size // patch_size) ** 2` placeholder tokens (the CLIP [CLS] token is
    counted by `num_additional_image_tokens=1` and dropped by the `"default"` strategy).

    Args:
        words (`Iterable[str]`):
            Vocabulary words, see [`build_word_tokenizer`].
        image_size (`int`, *optional*, defaults to `32`):
            Side of the square images fed to the vision tower.
        patch_size (`int`, *optional*, defaults to `8`):
            Patch side of the vision tower; must divide `image_size`.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the [CLS] feature, `"full"` keeps it (one more placeholder per image).
        padding_side (`str`, *optional*, defaults to `"right"`):
            Padding side of the tokenizer (`"left"` for batched generation).

    Returns:
        [`~transformers.LlavaProcessor`]: the processor, with the chat template set.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_processor
    >>> processor = build_tiny_processor(["what", "color", "red"], image_size=32, patch_size=8)
    >>> inputs = processor(images=[Image.new("RGB", (40, 30))], text=["<image> what color ?"], return_tensors="pt")
    >>> inputs["pixel_values"].shape, (inputs["input_ids"] == processor.image_token_id).sum().item()
    (torch.Size([1, 3, 32, 32]), 16)
    ```
    """
    check_patch_size(image_size, patch_size)
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}"
        )
    tokenizer = build_word_tokenizer(words, padding_side=padding_side)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_tiny_llava(
    processor: LlavaProcessor,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -1,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """
    Build a randomly initialised [`~transformers.LlavaForConditionalGeneration`] (CLIP vision tower, Llama decoder)
    that matches `processor`.

    Vocabulary size, special token ids, image size, patch size and feature-selection strategy come from the
    processor, so its outputs can be fed to the model as they are. The widths, depths, `seed` and
    `attn_implementation` are those every tiny builder takes (see [`build_tiny_model_and_processor`]), with LLaVA's
    own defaults (`hidden_size=64`, `intermediate_size=128`, `num_attention_heads=4`) and a vision tower whose MLP is
    4x wider.

    Args:
        processor ([`~transformers.LlavaProcessor`]):
            A processor from [`build_tiny_processor`] (or any LLaVA processor with a CLIP-style image processor).
        vision_feature_layer (`int`, *optional*, defaults to `-1`):
            Vision hidden state fed to the projector (LLaVA-1.5 uses `-2`, which leaves the last tower layer unused).

    Returns:
        [`~transformers.LlavaForConditionalGeneration`]: the model, in float32 and in eval mode.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_llava, build_tiny_processor
    >>> model = build_tiny_llava(build_tiny_processor(["what", "color", "red"]), hidden_size=32, seed=1)
    >>> model.config.text_config.hidden_size, model.config.image_token_id
    (32, 4)
    ```
    """
    arguments, tokenizer = locals(), processor.tokenizer
    shape: TinyShape = {name: arguments[name] for name in TinyShape.__annotations__}
    build = TinyBuild(shape, seed=seed, attn_implementation=attn_implementation)
    image_size, patch_size = processor.image_processor.crop_size["height"], processor.patch_size
    num_patches = (image_size // patch_size) ** 2
    strategy = processor.vision_feature_select_strategy or "default"
    vision_config = CLIPVisionConfig(
        **build.vision_config(image_size=image_size, patch_size=patch_size, mlp_ratio=4),
        projection_dim=vision_hidden_size,
    )
    text_config = LlamaConfig(**build.text_config(tokenizer), max_position_embeddings=max(2048, 4 * num_patches))
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=processor.image_token_id,
        image_seq_length=num_patches + (strategy == "full"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision_feature_layer,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return build.model(LlavaForConditionalGeneration, config, tokenizer)


@dataclass(frozen=True)
class TinyLlavaPreset:
    """
    Shape of a tiny LLaVA: image geometry for [`build_tiny_processor`] and widths for [`build_tiny_llava`].

    The fields after `patch_size` are the arguments of [`build_tiny_llava`] of the same names, with its defaults.

    Args:
        image_size (`int`):
            Side of the square input images.
        patch_size (`int`):
            Patch side; `(image_size // patch_size) ** 2` visual tokens per image.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import TINY_LLAVA_PRESETS
    >>> TINY_LLAVA_PRESETS["llava15"].num_visual_tokens
    576
    ```
    """

    image_size: int
    patch_size: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_feature_layer: int = -1

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# Widths of the presets with a real model's token geometry: wide enough for the visual tokens to differ.
_WIDER = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    vision_hidden_size=64,
    vision_layers=2,
    vision_feature_layer=-2,
)

TINY_LLAVA_PRESETS: dict[str, TinyLlavaPreset] = {
    # Unit tests: 16 visual tokens, a forward pass takes milliseconds.
    "test": TinyLlavaPreset(image_size=32, patch_size=8),
    # LLaVA-1.5's token geometry (336 px, 14 px patches, 576 tokens, features from layer -2) at tiny widths.
    "llava15": TinyLlavaPreset(image_size=336, patch_size=14, **_WIDER),
    # A ViT-B/16-style grid at the same widths: 224 px, 16 px patches, 196 tokens.
    "vit196": TinyLlavaPreset(image_size=224, patch_size=16, **_WIDER),
}


@register_tiny_family("llava")
def build_tiny_llava_and_processor(
    preset: str | TinyLlavaPreset = "test",
    *,
    words: Iterable[str],
    seed: int = 0,
    vision_feature_select_strategy: str = "default",
    padding_side: str = "right",
    attn_implementation: str = "sdpa",
    **overrides,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """
    Build a matching tiny LLaVA model and processor from a named preset.

    `words`, `seed`, `padding_side` and `attn_implementation` are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        preset (`str` or [`TinyLlavaPreset`], *optional*, defaults to `"test"`):
            A key of `TINY_LLAVA_PRESETS` (`"test"`: 32 px / 8 px patches, 16 visual tokens; `"llava15"`: 336 / 14,
            576 tokens; `"vit196"`: 224 / 16, 196 tokens) or a preset object.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            See [`build_tiny_processor`].
        **overrides:
            Fields of [`TinyLlavaPreset`] to change, e.g. `hidden_size=128` or `image_size=96`.

    Returns:
        `tuple[LlavaForConditionalGeneration, LlavaProcessor]`: the model (eval mode) and its processor.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> model, processor = build_tiny_llava_and_processor("vit196", words=["red"], hidden_size=32)
    >>> model.config.image_seq_length, model.config.text_config.hidden_size
    (196, 32)
    ```
    """
    if isinstance(preset, str):
        if preset not in TINY_LLAVA_PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(TINY_LLAVA_PRESETS)}.")
        preset = TINY_LLAVA_PRESETS[preset]
    fields = set(asdict(preset))
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"Unknown overrides {sorted(unknown)}; TinyLlavaPreset fields are {sorted(fields)}.")
    shape = asdict(replace(preset, **overrides))
    processor = build_tiny_processor(
        words,
        image_size=shape.pop("image_size"),
        patch_size=shape.pop("patch_size"),
        vision_feature_select_strategy=vision_feature_select_strategy,
        padding_side=padding_side,
    )
    model = build_tiny_llava(processor, seed=seed, attn_implementation=attn_implementation, **shape)
    return model, processor

"""Tiny InternVL (`internvl`): dynamic tiling plus a thumbnail, pixel-shuffle projector, Qwen2 decoder.

Geometry (defaults): 32 px tiles, 4 px patches (64 patches) pixel-shuffled by `downsample_ratio=0.5` to 16 visual
tokens per tile. [`~transformers.GotOcr2ImageProcessorPil`] with `crop_to_patches` splits each image into the grid
of at most `max_tiles=4` tiles that best fits its aspect ratio and, when there is more than one tile, adds a
thumbnail of the whole image: 1 tile (16 tokens) for a 40 x 30 (width x height) image, 2 + 1 (48) for 30 x 60,
4 + 1 (80) for 64 x 64 or 100 x 20.

The chat template writes `<IMG_CONTEXT>` (the placeholder InternVL's processor counts and expands); each image
becomes one run `<img> <IMG_CONTEXT> x (16 * tiles) </img>`. The processor returns only `input_ids`,
`attention_mask` and `pixel_values` `(tiles of all images, 3, 32, 32)`, so the tiles of each image are known only
from the placeholder counts. `get_image_features(...).pooler_output` is a tensor `(tiles, 16, hidden)`.

[`ImageOnlyInternVLProcessor`] is the stock processor without its torchvision-only video processor (see
`register_processor` in `_common.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, register_processor
from .registry import register_tiny_family

INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


class InternVLBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of [`build_tiny_internvl`]: every builder's and its image geometry."""

    image_size: int
    patch_size: int
    max_tiles: int


def tiled_geometry(family: str, kwargs: InternVLBuilderKwargs) -> tuple[TinyBuild, int, int, GotOcr2ImageProcessorPil]:
    """
    The `TinyBuild` of a tiling builder's `kwargs` (InternVL's, Aya Vision's), its checked tile and patch sizes, and
    the [`~transformers.GotOcr2ImageProcessorPil`] that splits images into at most `max_tiles` tiles plus a thumbnail.
    """
    build = TinyBuild.of(family, kwargs, InternVLBuilderKwargs)
    image_size, patch_size = kwargs.get("image_size", 32), kwargs.get("patch_size", 4)
    if image_size % (2 * patch_size):
        raise ValueError(
            f"image_size must be a multiple of 2 * patch_size (pixel shuffle by 2), got image_size={image_size}, "
            f"patch_size={patch_size}"
        )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=kwargs.get("max_tiles", 4),
    )
    return build, image_size, patch_size, image_processor


@register_processor
class ImageOnlyInternVLProcessor(InternVLProcessor):
    """
    [`~transformers.InternVLProcessor`] without its video processor (see `register_processor`).

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_internvl
    >>> _, processor = build_tiny_internvl(words=["red"])
    >>> type(processor).__name__, processor.image_token, processor.image_seq_length
    ('ImageOnlyInternVLProcessor', '<IMG_CONTEXT>', 16)
    ```
    """

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs
    ):
        super().__init__(
            image_processor,
            tokenizer,
            video_processor=None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


@register_tiny_family("internvl")
def build_tiny_internvl(
    *, words: Iterable[str], **kwargs: Unpack[InternVLBuilderKwargs]
) -> tuple[InternVLForConditionalGeneration, ImageOnlyInternVLProcessor]:
    """
    Build a tiny InternVL (InternViT-style tower, pixel-shuffle projector, Qwen2 decoder, dynamic tiling) and its
    image-only processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side of a tile and of the thumbnail (the vision tower's input).
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower; `(image_size // patch_size) ** 2 / 4` visual tokens per tile.
        max_tiles (`int`, *optional*, defaults to `4`):
            Most tiles per image (a thumbnail is added when there are several).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_internvl
    >>> model, processor = build_tiny_internvl(words=["what", "color", "red"])
    >>> processor.image_seq_length, processor.image_processor.max_patches  # tokens per tile, most tiles per image
    (16, 4)
    >>> inputs = processor(text=["<IMG_CONTEXT> what color ?"], images=[Image.new("RGB", (30, 60))], return_tensors="pt")
    >>> inputs["pixel_values"].shape, (inputs["input_ids"] == model.config.image_token_id).sum().item()
    (torch.Size([3, 3, 32, 32]), 48)
    >>> processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, [0, 1, 49, 50]].tolist())
    ['<img>', '<IMG_CONTEXT>', '</img>', 'what']
    ```
    """
    build, image_size, patch_size, image_processor = tiled_geometry("internvl", kwargs)
    tokenizer = build.tokenizer(words, INTERNVL_TOKENS["context_image_token"], named_special_tokens=INTERNVL_TOKENS)
    image_seq_length = (image_size // patch_size) ** 2 // 4
    processor = build.processor(
        ImageOnlyInternVLProcessor, image_processor, tokenizer, image_seq_length=image_seq_length
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            **build.vision_config(image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
        ),
        text_config=Qwen2Config(**build.text_config(tokenizer)),
        image_token_id=processor.image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return build.model(InternVLForConditionalGeneration, config, tokenizer), processor

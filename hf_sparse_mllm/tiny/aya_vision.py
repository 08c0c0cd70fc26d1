"""Tiny Aya Vision (`aya_vision`): SigLIP tower, pixel-shuffle projector, Cohere2 decoder, dynamic tiling.

Geometry (defaults): as InternVL's ([`build_tiny_internvl`]): 32 px tiles, 4 px patches (64 patches) pixel-shuffled
2 x 2 to 16 visual tokens per tile; [`~transformers.GotOcr2ImageProcessorPil`] splits each image into at most 4
tiles and, when there are several, adds a thumbnail: 16 visual tokens for a 40 x 30 (width x height) image (one
tile), 48 for 30 x 60 (2 tiles + thumbnail). `pixel_values` is `(tiles of all images, 3, 32, 32)`; the processor
returns no per-image tile counts.

The chat template writes `<image>`, which [`~transformers.AyaVisionProcessor`] expands to
`<|START_OF_IMG|> TILE_1 <|IMG_PATCH|> x 16 ... TILE_GLOBAL <|IMG_PATCH|> x 16 <|END_OF_IMG|>` (the thumbnail last;
an image of one tile is only `TILE_GLOBAL` and its patches). `<|IMG_PATCH|>` is the image token; the tile markers
are plain text (here the words `tile`, `_`, `global` and a digit). So every tile is one placeholder run.
`get_image_features(...).pooler_output` is a tensor `(tiles, 16, hidden)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    AyaVisionProcessor,
    Cohere2Config,
    SiglipVisionConfig,
)

from ._common import Unpack
from .internvl import InternVLBuilderKwargs, tiled_geometry
from .registry import register_tiny_family
from .tokenizer import IMAGE_TOKEN

AYA_VISION_TOKENS = {
    "start_of_img_token": "<|START_OF_IMG|>",
    "end_of_img_token": "<|END_OF_IMG|>",
    "img_patch_token": "<|IMG_PATCH|>",
    "img_line_break_token": "<|IMG_LINE_BREAK|>",
}
# The tile markers `TILE_<i>` and `TILE_GLOBAL` are text, split by the word tokenizer.
_TILE_WORDS = ("tile", "global", *map(str, range(1, 10)))


@register_tiny_family("aya_vision")
def build_tiny_aya_vision(
    *, words: Iterable[str], **kwargs: Unpack[InternVLBuilderKwargs]
) -> tuple[AyaVisionForConditionalGeneration, AyaVisionProcessor]:
    """
    Build a tiny Aya Vision (SigLIP tower, pixel-shuffle projector, Cohere2 decoder, dynamic tiling) and its
    processor, offline.

    The arguments are those of [`build_tiny_internvl`] (`image_size`, `patch_size`, `max_tiles`).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor
    >>> model, processor = build_tiny_model_and_processor("aya_vision", words=["red"])
    >>> tall = Image.new("RGB", (30, 60))  # two tiles and a thumbnail
    >>> inputs = processor(text=["<image> red"], images=[tall], return_tensors="pt")
    >>> inputs["pixel_values"].shape, (inputs["input_ids"] == model.config.image_token_id).sum().item()
    (torch.Size([3, 3, 32, 32]), 48)
    >>> processor.tokenizer.decode(inputs["input_ids"][0, :5])
    '<|START_OF_IMG|> tile _ 1 <|IMG_PATCH|>'
    ```
    """
    build, image_size, patch_size, image_processor = tiled_geometry("aya_vision", kwargs)
    tokenizer = build.tokenizer(
        [*words, *_TILE_WORDS],
        IMAGE_TOKEN,
        named_special_tokens=AYA_VISION_TOKENS,
    )
    processor = build.processor(
        AyaVisionProcessor,
        image_processor,
        tokenizer,
        patch_size=patch_size,
        img_size=image_size,
        downsample_factor=2,
        image_token=IMAGE_TOKEN,
        **AYA_VISION_TOKENS,
    )
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**build.vision_config(image_size=image_size, patch_size=patch_size)),
        text_config=Cohere2Config(**build.text_config(tokenizer), sliding_window=32),
        image_token_index=processor.image_token_id,
        downsample_factor=2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return build.model(AyaVisionForConditionalGeneration, config, tokenizer), processor

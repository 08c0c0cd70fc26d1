"""Tiny VipLLaVA (`vipllava`): LLaVA-1.5's layout, with the features of several vision layers concatenated.

Geometry (defaults): as the `llava` test preset's, 32 x 32 images (resized and center-cropped by
[`~transformers.CLIPImageProcessorPil`]), 8 px patches: 16 visual tokens per image, one run of `<image>` per image
(the processor is [`~transformers.LlavaProcessor`], the stock one for VipLLaVA). The projector layer-norms and
projects the concatenated hidden states of the tower's layers `vision_feature_layer` (here the last two), each
without its CLS feature. `get_image_features(...).pooler_output` is a tensor `(images, 16, hidden)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaProcessor,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from ._common import SquareImageBuilderKwargs, TinyBuild, Unpack
from .llava import build_tiny_processor
from .registry import register_tiny_family


@register_tiny_family("vipllava")
def build_tiny_vipllava(
    *, words: Iterable[str], **kwargs: Unpack[SquareImageBuilderKwargs]
) -> tuple[VipLlavaForConditionalGeneration, LlavaProcessor]:
    """
    Build a tiny VipLLaVA (CLIP tower whose last two layers feed the projector, Llama decoder) and its processor
    (LLaVA's, [`build_tiny_processor`]), offline.

    Its arguments are those of [`build_tiny_paligemma`]: every tiny builder's, `image_size` (32) and `patch_size`
    (8), for `(image_size // patch_size) ** 2` visual tokens per image.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_vipllava
    >>> model, processor = build_tiny_vipllava(words=["red"], patch_size=16)
    >>> model.config.vision_feature_layer, model.config.image_seq_length
    ([-2, -1], 4)
    ```
    """
    build = TinyBuild.of("vipllava", kwargs, SquareImageBuilderKwargs)
    image_size, patch_size = kwargs.get("image_size", 32), kwargs.get("patch_size", 8)
    processor = build_tiny_processor(
        words, image_size=image_size, patch_size=patch_size, padding_side=build.padding_side
    )
    tokenizer = processor.tokenizer
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(
            **build.vision_config(image_size=image_size, patch_size=patch_size),
            projection_dim=build.shape["vision_hidden_size"],
        ),
        text_config=LlamaConfig(**build.text_config(tokenizer)),
        image_token_index=processor.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=[-2, -1],
    )
    return build.model(VipLlavaForConditionalGeneration, config, tokenizer), processor

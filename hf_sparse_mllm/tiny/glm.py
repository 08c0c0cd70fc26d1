"""Tiny GLM-4V (`glm4v`, GLM-4.1V), GLM-4.5V (`glm4v_moe`, a mixture-of-experts decoder) and GLM-4.6V (`glm46v`):
Qwen2-VL-like.

Geometry (defaults, all three): as the Qwen families' ([`build_tiny_qwen2_vl`]): 8 px patches merged 2 x 2, images
resized to multiples of 16 px with between 32 x 32 and 96 x 96 pixels, e.g. 12 visual tokens for a 64 x 48
(width x height) image (`image_grid_thw` `[1, 6, 8]`) and 18 for 48 x 96 (`[1, 12, 6]`). The image processor is
[`~transformers.Glm4vImageProcessorPil`], whose pixel limits count both temporal copies of an image (the builder
doubles them). `pixel_values` is 2-D, `(patches, 3 * 2 * 8 * 8)`.

Each image is `<|begin_of_image|> <|image|> x N <|end_of_image|>` in `input_ids`; the processor returns
`image_grid_thw` and `mm_token_type_ids` (1 at image tokens), from which the model's `get_rope_index` computes its
3-D M-RoPE positions (an image advances the text position by `max(h, w) / merge`, not by its token count).
`get_image_features(...).pooler_output` is a tuple with one `(tokens, hidden)` tensor per image. The tower has
learned position embeddings on an 8 x 8 grid (`image_size = 8 * patch_size`), interpolated to each image, and a
strided convolution that merges 2 x 2 patches.

GLM-4.5V's decoder here: layer 0 dense (`first_k_dense_replace=1`), the others 4 routed experts (2 per token) and
one shared expert; half of each head is rotated (`partial_rotary_factor=0.5`, the stock config's), so the M-RoPE
sections split 4 frequencies, not 8.

GLM-4.6V is GLM-4V's tower and decoder under its own config, processor ([`ImageOnlyGlm46VProcessor`]) and image
processor ([`~transformers.Glm46VImageProcessorPil`]), with the same layout and positions.

The processors are image-only subclasses of [`~transformers.Glm4vProcessor`] ([`ImageOnlyGlm4vProcessor`], for the
first two families) and [`~transformers.Glm46VProcessor`], since the stock ones hold a torchvision-only video
processor (see `register_processor`).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessorPil,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    Glm46VConfig,
    Glm46VForConditionalGeneration,
    Glm46VImageProcessorPil,
    Glm46VProcessor,
)

from ._common import Unpack, register_processor
from .qwen import MRopeFamily, QwenBuilderKwargs, _ImageOnly, build_mrope_family
from .registry import register_tiny_family

GLM_TOKENS = {
    "image_token": "<|image|>",
    "video_token": "<|video|>",
    "image_start_token": "<|begin_of_image|>",
    "image_end_token": "<|end_of_image|>",
    "video_start_token": "<|begin_of_video|>",
    "video_end_token": "<|end_of_video|>",
}
GLM_IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"


@register_processor
class ImageOnlyGlm4vProcessor(_ImageOnly, Glm4vProcessor):
    """
    [`~transformers.Glm4vProcessor`] without its video processor.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_glm4v
    >>> _, processor = build_tiny_glm4v(words=["red"])
    >>> type(processor).__name__, processor.get_attributes(), processor.image_token
    ('ImageOnlyGlm4vProcessor', ['image_processor', 'tokenizer'], '<|image|>')
    ```
    """


@register_processor
class ImageOnlyGlm46VProcessor(_ImageOnly, Glm46VProcessor):
    """[`~transformers.Glm46VProcessor`] without its video processor (see [`ImageOnlyGlm4vProcessor`])."""


def _family(
    config_class,
    model_class,
    partial_rotary_factor=1.0,
    processor_class=ImageOnlyGlm4vProcessor,
    image_processor_class=Glm4vImageProcessorPil,
    **moe,
) -> MRopeFamily:
    return MRopeFamily(
        config_class,
        model_class,
        processor_class,
        GLM_TOKENS,
        GLM_IMAGE_PLACEHOLDER,
        image_processor_class=image_processor_class,
        frames_in_pixel_limits=2,
        moe=moe or None,
        partial_rotary_factor=partial_rotary_factor,
    )


_GLM = {
    "glm4v": _family(Glm4vConfig, Glm4vForConditionalGeneration),
    "glm4v_moe": _family(
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,  # the stock config's: half of each head rotated
    ),
    "glm46v": _family(
        Glm46VConfig,
        Glm46VForConditionalGeneration,
        processor_class=ImageOnlyGlm46VProcessor,
        image_processor_class=Glm46VImageProcessorPil,
    ),
}


@register_tiny_family("glm4v")
def build_tiny_glm4v(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Glm4vForConditionalGeneration, ImageOnlyGlm4vProcessor]:
    """
    Build a tiny GLM-4V (GLM-4.1V: dynamic-resolution vision tower, M-RoPE decoder) and its image-only processor,
    offline.

    The arguments are those of [`build_tiny_qwen2_vl`] (`min_pixels` and `max_pixels` count one copy of the image).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import GLM_IMAGE_PLACEHOLDER, build_tiny_model_and_processor
    >>> model, processor = build_tiny_model_and_processor("glm4v", words=["red"])
    >>> image = Image.new("RGB", (48, 96))
    >>> inputs = processor(text=[GLM_IMAGE_PLACEHOLDER + " red"], images=[image], return_tensors="pt")
    >>> inputs["image_grid_thw"].tolist(), inputs["mm_token_type_ids"].tolist()[0].count(1)
    ([[1, 12, 6]], 18)
    >>> positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    >>> positions[:, 0, -2:].tolist()  # <|end_of_image|> and "red": the image advanced the position by max(6, 3)
    [[7, 8], [7, 8], [7, 8]]
    ```
    """
    return build_mrope_family("glm4v", _GLM["glm4v"], words, kwargs)


@register_tiny_family("glm4v_moe")
def build_tiny_glm4v_moe(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Glm4vMoeForConditionalGeneration, ImageOnlyGlm4vProcessor]:
    """
    Build a tiny GLM-4.5V (`glm4v_moe`: GLM-4V's tower and processor, a mixture-of-experts decoder) and its
    image-only processor, offline.

    The arguments are those of [`build_tiny_glm4v`]; decoder layer 0 is dense, the others have 4 routed experts of
    `intermediate_size` (2 per token) and a shared one.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_glm4v_moe
    >>> model, _ = build_tiny_glm4v_moe(words=["red"])
    >>> [type(layer.mlp).__name__ for layer in model.model.language_model.layers]
    ['Glm4vMoeTextMLP', 'Glm4vMoeTextMoE']
    >>> model.config.text_config.rope_parameters["mrope_section"]  # 4 rotary frequencies of a 16-wide head
    [2, 1, 1]
    ```
    """
    return build_mrope_family("glm4v_moe", _GLM["glm4v_moe"], words, kwargs)


@register_tiny_family("glm46v")
def build_tiny_glm46v(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Glm46VForConditionalGeneration, ImageOnlyGlm46VProcessor]:
    """
    Build a tiny GLM-4.6V (`glm46v`: GLM-4V's tower and decoder, its own processor) and its image-only processor,
    offline.

    The arguments are those of [`build_tiny_glm4v`].

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import GLM_IMAGE_PLACEHOLDER, build_tiny_model_and_processor
    >>> model, processor = build_tiny_model_and_processor("glm46v", words=["red"])
    >>> inputs = processor(text=[GLM_IMAGE_PLACEHOLDER + " red"], images=[Image.new("RGB", (48, 96))], return_tensors="pt")
    >>> type(processor).__name__, inputs["image_grid_thw"].tolist(), inputs["mm_token_type_ids"].sum().item()
    ('ImageOnlyGlm46VProcessor', [[1, 12, 6]], 18)
    ```
    """
    return build_mrope_family("glm46v", _GLM["glm46v"], words, kwargs)

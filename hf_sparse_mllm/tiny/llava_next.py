"""Tiny LLaVA-NeXT (`llava_next`) and LLaVA-OneVision (`llava_onevision`): anyres tiling, variable tokens per image.

Geometry (defaults): 32 px tiles, 8 px patches (16 features per tile), `image_grid_pinpoints` `[[32, 64], [64, 32]]`,
so every image becomes a 32 x 32 base tile plus a 2-tile grid (`pixel_values` `(images, 3, 3, 32, 32)`). The visual
tokens of one image are one run of `<image>` (no start/end tokens): the 16 base-tile features, then the anyres grid
cropped to the image's aspect ratio ("unpadded") with one learned `image_newline` row after every grid row. The count
depends on `image_sizes`: 44 tokens for a 40 x 30 (width x height) image, 56 for 30 x 60, 36 for 64 x 64, 34 for
100 x 20 (LLaVA-NeXT and OneVision alike, the CLS feature being dropped by NeXT's `"default"` strategy and absent
from OneVision's SigLIP tower).

- LLaVA-NeXT: CLIP tower, Llama decoder, [`~transformers.LlavaNextImageProcessorPil`]. The processor returns
  `pixel_values` and `image_sizes` `(images, 2)` (height, width).
- LLaVA-NeXT-Video (`llava_next_video`, images only): LLaVA-NeXT's model and image processor with a `<video>`
  token, and [`ImageOnlyLlavaNextVideoProcessor`]; images give the same tokens as LLaVA-NeXT's.
- LLaVA-OneVision: SigLIP tower, Qwen2 decoder, [`~transformers.LlavaOnevisionImageProcessorPil`], and
  [`ImageOnlyLlavaOnevisionProcessor`] (the stock processor without its torchvision-only video processor, see
  `register_processor` in `_common.py`). It also returns `batch_num_images` `(samples,)`; a sample with several
  images gets no anyres grid: each of its images is its base tile plus one newline feature (17 tokens).

`get_image_features(...).pooler_output` is a list with one `(tokens, hidden)` tensor per image, computed per tile by
the projector, then unpadded and given its newline rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, check_patch_size, register_processor
from .registry import register_tiny_family
from .tokenizer import IMAGE_TOKEN

VIDEO_TOKEN = "<video>"
DEFAULT_PINPOINTS = ((32, 64), (64, 32))


class LlavaNextBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of both builders: every builder's and the geometry of [`build_tiny_llava_next`]."""

    image_size: int
    patch_size: int
    image_grid_pinpoints: Sequence[Sequence[int]]


@register_processor
class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """
    [`~transformers.LlavaOnevisionProcessor`] without its video processor (see `register_processor`).

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import ImageOnlyLlavaOnevisionProcessor, build_tiny_llava_onevision
    >>> _, processor = build_tiny_llava_onevision(words=["red"])
    >>> isinstance(processor, ImageOnlyLlavaOnevisionProcessor), processor.get_attributes()
    (True, ['image_processor', 'tokenizer'])
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


@register_processor
class ImageOnlyLlavaNextVideoProcessor(LlavaNextVideoProcessor):
    """
    [`~transformers.LlavaNextVideoProcessor`] without its video processor (see `register_processor`).

    The stock `__init__` hands its sub-processors to `ProcessorMixin.__init__` positionally as `(video_processor,
    image_processor, tokenizer)`, which pairs them with the class's attributes in order: without `video_processor`
    they would shift (the image processor taken for the tokenizer), so this `__init__` sets the stock attributes
    itself and calls `ProcessorMixin.__init__` with the two it has.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_next_video
    >>> _, processor = build_tiny_llava_next_video(words=["red"])
    >>> type(processor).__name__, processor.get_attributes()
    ('ImageOnlyLlavaNextVideoProcessor', ['image_processor', 'tokenizer'])
    >>> type(processor.image_processor).__name__, processor.video_token, processor.patch_size
    ('LlavaNextImageProcessorPil', '<video>', 8)
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        video_token=VIDEO_TOKEN,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        **kwargs,
    ):
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", image_token)
        self.video_token = getattr(tokenizer, "video_token", video_token)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def _arguments(family: str, kwargs: LlavaNextBuilderKwargs) -> tuple[TinyBuild, int, int, list[list[int]]]:
    """The `TinyBuild` of a builder's `kwargs` and its checked geometry: image size, patch size, grid pinpoints."""
    build = TinyBuild.of(family, kwargs, LlavaNextBuilderKwargs)
    image_size, patch_size = kwargs.get("image_size", 32), kwargs.get("patch_size", 8)
    check_patch_size(image_size, patch_size)
    pinpoints = [[int(h), int(w)] for h, w in kwargs.get("image_grid_pinpoints", DEFAULT_PINPOINTS)]
    bad = [p for p in pinpoints if p[0] % image_size or p[1] % image_size]
    if bad:
        raise ValueError(f"image_grid_pinpoints must be multiples of image_size={image_size}, got {bad}")
    return build, image_size, patch_size, pinpoints


@register_tiny_family("llava_next")
def build_tiny_llava_next(
    *, words: Iterable[str], **kwargs: Unpack[LlavaNextBuilderKwargs]
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """
    Build a tiny LLaVA-NeXT (CLIP tower, Llama decoder, anyres tiling) and its processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side of the base tile and of the anyres grid's tiles (the vision tower's input).
        patch_size (`int`, *optional*, defaults to `8`):
            Patch side of the vision tower; `(image_size // patch_size) ** 2` features per tile.
        image_grid_pinpoints (`Sequence[Sequence[int]]`, *optional*, defaults to `((32, 64), (64, 32))`):
            Candidate `(height, width)` resolutions of the anyres grid, multiples of `image_size`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_next
    >>> model, processor = build_tiny_llava_next(words=["what", "color", "red"])
    >>> inputs = processor(text=["<image> what color ?"], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    >>> inputs["pixel_values"].shape, inputs["image_sizes"].tolist()
    (torch.Size([1, 3, 3, 32, 32]), [[30, 40]])
    >>> (inputs["input_ids"] == processor.image_token_id).sum().item()
    44
    ```
    """
    return _build_clip_anyres("llava_next", words, kwargs)


def _build_clip_anyres(family: str, words: Iterable[str], kwargs: LlavaNextBuilderKwargs):
    """LLaVA-NeXT's build (CLIP tower, Llama decoder, anyres tiling), shared with LLaVA-NeXT-Video."""
    video = family == "llava_next_video"
    build, image_size, patch_size, pinpoints = _arguments(family, kwargs)
    tokenizer = build.tokenizer(words, named_special_tokens={"video_token": VIDEO_TOKEN} if video else None)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = build.processor(
        ImageOnlyLlavaNextVideoProcessor if video else LlavaNextProcessor,
        image_processor,
        tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS feature, dropped by the "default" strategy
    )
    config_class, model_class = (
        (LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration)
        if video
        else (LlavaNextConfig, LlavaNextForConditionalGeneration)
    )
    extra = {"video_token_id": processor.video_token_id} if video else {}
    config = config_class(
        vision_config=CLIPVisionConfig(
            **build.vision_config(image_size=image_size, patch_size=patch_size),
            projection_dim=build.shape["vision_hidden_size"],
        ),
        text_config=LlamaConfig(**build.text_config(tokenizer)),
        image_token_id=processor.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        **extra,
    )
    return build.model(model_class, config, tokenizer), processor


@register_tiny_family("llava_next_video")
def build_tiny_llava_next_video(
    *, words: Iterable[str], **kwargs: Unpack[LlavaNextBuilderKwargs]
) -> tuple[LlavaNextVideoForConditionalGeneration, ImageOnlyLlavaNextVideoProcessor]:
    """
    Build a tiny LLaVA-NeXT-Video (LLaVA-NeXT's CLIP tower, Llama decoder and anyres tiling; images only) and its
    image-only processor, offline.

    The arguments are those of [`build_tiny_llava_next`]; images give the same visual tokens as LLaVA-NeXT's.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor
    >>> model, processor = build_tiny_model_and_processor("llava_next_video", words=["red"])
    >>> wide = Image.new("RGB", (40, 30))
    >>> inputs = processor(text=["<image> red"], images=[wide], return_tensors="pt")
    >>> inputs["image_sizes"].tolist(), (inputs["input_ids"] == model.config.image_token_id).sum().item()
    ([[30, 40]], 44)
    ```
    """
    return _build_clip_anyres("llava_next_video", words, kwargs)


@register_tiny_family("llava_onevision")
def build_tiny_llava_onevision(
    *, words: Iterable[str], **kwargs: Unpack[LlavaNextBuilderKwargs]
) -> tuple[LlavaOnevisionForConditionalGeneration, ImageOnlyLlavaOnevisionProcessor]:
    """
    Build a tiny LLaVA-OneVision (SigLIP tower, Qwen2 decoder, anyres tiling) and its image-only processor, offline.

    The arguments are those of [`build_tiny_llava_next`].

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_onevision
    >>> model, processor = build_tiny_llava_onevision(words=["what", "color", "red"])
    >>> processor.vision_feature_select_strategy, model.config.vision_config.model_type  # no CLS feature to drop
    ('full', 'siglip_vision_model')
    >>> inputs = processor(text=["<image> what color ?"], images=[Image.new("RGB", (30, 60))], return_tensors="pt")
    >>> inputs["pixel_values"].shape, inputs["batch_num_images"].tolist()
    (torch.Size([1, 3, 3, 32, 32]), [1])
    >>> (inputs["input_ids"] == processor.image_token_id).sum().item()
    56
    ```
    """
    build, image_size, patch_size, pinpoints = _arguments("llava_onevision", kwargs)
    tokenizer = build.tokenizer(words, named_special_tokens={"video_token": VIDEO_TOKEN})
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = build.processor(
        ImageOnlyLlavaOnevisionProcessor,
        image_processor,
        tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",  # SigLIP has no CLS feature to drop
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**build.vision_config(image_size=image_size, patch_size=patch_size)),
        text_config=Qwen2Config(**build.text_config(tokenizer)),
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return build.model(LlavaOnevisionForConditionalGeneration, config, tokenizer), processor

"""Tiny Qwen2-VL (`qwen2_vl`), Qwen2.5-VL (`qwen2_5_vl`), Qwen3-VL (`qwen3_vl`), Qwen3-VL-MoE (`qwen3_vl_moe`),
Qwen3.5 (`qwen3_5`) and Qwen3.5-MoE (`qwen3_5_moe`): dynamic resolution, M-RoPE.

Geometry (defaults, all six): 8 px patches merged 2 x 2, so one visual token per 16 x 16 pixels. The image
processor ([`~transformers.Qwen2VLImageProcessorPil`], shared by the four families) resizes every image to
multiples of 16 px with between 32 x 32 and 96 x 96 pixels (`min_pixels=1024`, `max_pixels=9216`): 4 to 36
visual tokens, `t * h * w / 4` from `image_grid_thw` `(images, 3)`, e.g. 12 tokens for a 64 x 48 (width x height)
image (grid `[1, 6, 8]`) and 18 for 48 x 96 (grid `[1, 12, 6]`). `pixel_values` is 2-D: `(patches, 3 * 2 * 8 * 8)`
for all images of the batch together.

Each image is `<|vision_start|> <|image_pad|> x N <|vision_end|>` in `input_ids` (the chat template writes one
`<|image_pad|>` between the start and end tokens; the processor repeats it). The processors return
`image_grid_thw` and `mm_token_type_ids` (1 at image tokens), which the models need for their 3-D M-RoPE positions.
`get_image_features(...).pooler_output` is a tuple with one `(tokens, hidden)` tensor per image.

- Qwen2.5-VL's vision tower uses window attention (`window_size=32` px: 2 x 2 merged tokens per window, full
  attention in its last block), so its merger output is in window order before `get_image_features` restores
  raster order.
- Qwen3-VL's tower has learned position embeddings (an 8 x 8 grid, interpolated) and one deepstack level (after
  vision block 0): `get_image_features` also returns `deepstack_features`, a list over levels of tuples per image.
- Qwen3-VL-MoE is Qwen3-VL (same tower, deepstack and processor) with a mixture-of-experts decoder: here 4 experts
  per layer, 2 per token, their weights fused into one `(experts, ...)` parameter per projection.
- Qwen3.5 has Qwen3-VL's tower without deepstack and a hybrid decoder: linear-attention (Gated DeltaNet) layers and
  full-attention layers alternate (`full_attention_interval=2`: every second layer attends fully). Qwen3.5-MoE adds
  4 experts per layer (2 per token) and a shared expert. Both use Qwen3-VL's processor, as the stock checkpoints do.
  Their saved processors do not reload as they were: `AutoTokenizer` loads `Qwen3_5Tokenizer` for these model
  types whatever `tokenizer_config.json` says, and that BPE class cannot hold the tiny word-level tokenizer (the
  models reload, and real Qwen3.5 tokenizers are of that class).

The processors are image-only subclasses of the stock ones ([`ImageOnlyQwen2VLProcessor`], ...), since the stock
ones hold a torchvision-only video processor (see `register_processor` in `_common.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, register_processor
from .registry import register_tiny_family

QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of the Qwen builders: every builder's and the geometry of [`build_tiny_qwen2_vl`]."""

    patch_size: int
    min_pixels: int
    max_pixels: int


class _ImageOnly:
    """
    The `__init__` the three Qwen processors share, without `video_processor`: placed before the stock processor in
    the bases, it makes that processor build and reload without `torchvision` (see `register_processor`). Images and
    text are processed exactly as by the stock class.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor
    >>> for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
    ...     _, processor = build_tiny_model_and_processor(family, words=["red"], num_hidden_layers=1)
    ...     print(type(processor).__name__, processor.get_attributes())
    ImageOnlyQwen2VLProcessor ['image_processor', 'tokenizer']
    ImageOnlyQwen2_5_VLProcessor ['image_processor', 'tokenizer']
    ImageOnlyQwen3VLProcessor ['image_processor', 'tokenizer']
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


@register_processor
class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    """[`~transformers.Qwen2VLProcessor`] without its video processor (see `_ImageOnly` for an example)."""


@register_processor
class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """[`~transformers.Qwen2_5_VLProcessor`] without its video processor (see `_ImageOnly` for an example)."""


@register_processor
class ImageOnlyQwen3VLProcessor(_ImageOnly, Qwen3VLProcessor):
    """[`~transformers.Qwen3VLProcessor`] without its video processor (see `_ImageOnly` for an example)."""


@register_tiny_family("qwen2_vl")
def build_tiny_qwen2_vl(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor]:
    """
    Build a tiny Qwen2-VL (dynamic-resolution vision tower, M-RoPE decoder) and its image-only processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`]; `hidden_size // num_attention_heads` must be a multiple of 8 (the M-RoPE
    sections).

    Args:
        patch_size (`int`, *optional*, defaults to `8`):
            Patch side of the vision tower; patches are merged 2 x 2 into one visual token.
        min_pixels (`int`, *optional*, defaults to `1024`):
            Fewest pixels of a resized image (32 x 32: 4 visual tokens).
        max_pixels (`int`, *optional*, defaults to `9216`):
            Most pixels of a resized image (96 x 96: 36 visual tokens).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen2_vl
    >>> model, processor = build_tiny_qwen2_vl(words=["what", "color", "red"])
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    >>> text = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> text
    '<s> user : <|vision_start|><|image_pad|><|vision_end|> what color ? assistant :'
    >>> inputs = processor(text=[text], images=[Image.new("RGB", (64, 48))], return_tensors="pt")
    >>> inputs["image_grid_thw"].tolist(), (inputs["input_ids"] == model.config.image_token_id).sum().item()
    ([[1, 6, 8]], 12)
    >>> inputs["mm_token_type_ids"].sum().item()
    12
    ```
    """
    return _build("qwen2_vl", words, kwargs)


@register_tiny_family("qwen2_5_vl")
def build_tiny_qwen2_5_vl(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2_5_VLProcessor]:
    """
    Build a tiny Qwen2.5-VL (window-attention vision tower, M-RoPE decoder) and its image-only processor, offline.

    The arguments are those of [`build_tiny_qwen2_vl`]; the tower's windows are 2 x 2 merged tokens
    (`window_size = 4 * patch_size` pixels) and its last block attends globally.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen2_5_vl
    >>> model, processor = build_tiny_qwen2_5_vl(words=["red"], num_hidden_layers=1)
    >>> inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|> red"], images=[Image.new("RGB", (48, 96))])
    >>> inputs["image_grid_thw"].tolist(), model.config.vision_config.window_size
    ([[1, 12, 6]], 32)
    ```
    """
    return _build("qwen2_5_vl", words, kwargs)


@register_tiny_family("qwen3_vl")
def build_tiny_qwen3_vl(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """
    Build a tiny Qwen3-VL (vision tower with one deepstack level, interleaved M-RoPE decoder) and its image-only
    processor, offline.

    The arguments are those of [`build_tiny_qwen2_vl`]; the tower has learned position embeddings on an 8 x 8 grid
    (interpolated to each image) and feeds the features after its block 0 to the first decoder layer (deepstack).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen3_vl
    >>> model, processor = build_tiny_qwen3_vl(words=["red"])
    >>> inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|> red"], images=[Image.new("RGB", (64, 48))], return_tensors="pt")
    >>> features = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    >>> [f.shape for f in features.pooler_output], len(features.deepstack_features)
    ([torch.Size([12, 32])], 1)
    ```
    """
    return _build("qwen3_vl", words, kwargs)


@register_tiny_family("qwen3_vl_moe")
def build_tiny_qwen3_vl_moe(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen3VLMoeForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """
    Build a tiny Qwen3-VL-MoE (the vision tower of [`build_tiny_qwen3_vl`], a mixture-of-experts decoder) and its
    image-only processor (Qwen3-VL's: the stock checkpoints use `Qwen3VLProcessor` too), offline.

    The arguments are those of [`build_tiny_qwen2_vl`]; every decoder layer is sparse, with 4 experts of
    `intermediate_size` each and 2 experts per token (the router's auxiliary loss is off, as in the stock config).

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen3_vl_moe
    >>> model, processor = build_tiny_qwen3_vl_moe(words=["red"])
    >>> text = model.config.text_config
    >>> text.num_experts, text.num_experts_per_tok, type(model.model.language_model.layers[0].mlp).__name__
    (4, 2, 'Qwen3VLMoeTextSparseMoeBlock')
    ```
    """
    return _build("qwen3_vl_moe", words, kwargs)


@register_tiny_family("qwen3_5")
def build_tiny_qwen3_5(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen3_5ForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """
    Build a tiny Qwen3.5 (Qwen3-VL's vision tower without deepstack, a decoder whose linear-attention and
    full-attention layers alternate) and its image-only processor (Qwen3-VL's, as for the stock checkpoints), offline.

    The arguments are those of [`build_tiny_qwen2_vl`]. On CPU the linear-attention layers run `transformers`'
    PyTorch reference kernels.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen3_5
    >>> model, processor = build_tiny_qwen3_5(words=["red"])
    >>> model.config.text_config.layer_types
    ['linear_attention', 'full_attention']
    ```
    """
    return _build("qwen3_5", words, kwargs)


@register_tiny_family("qwen3_5_moe")
def build_tiny_qwen3_5_moe(
    *, words: Iterable[str], **kwargs: Unpack[QwenBuilderKwargs]
) -> tuple[Qwen3_5MoeForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """
    Build a tiny Qwen3.5-MoE ([`build_tiny_qwen3_5`] with a mixture-of-experts decoder: 4 experts of
    `intermediate_size` per layer, 2 per token, and a shared expert of the same width) and its image-only processor,
    offline.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_qwen3_5_moe
    >>> model, processor = build_tiny_qwen3_5_moe(words=["red"])
    >>> text = model.config.text_config
    >>> text.num_experts, text.num_experts_per_tok, text.layer_types
    (4, 2, ['linear_attention', 'full_attention'])
    ```
    """
    return _build("qwen3_5_moe", words, kwargs)


def _vision_config(family: str, build: TinyBuild, patch_size: int) -> dict:
    shape = build.shape
    shared = dict(
        depth=shape["vision_layers"],
        num_heads=shape["num_attention_heads"],
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2_vl":
        # `hidden_size` is the merger's output width (the decoder's), `embed_dim` the tower's own width.
        return dict(shared, embed_dim=shape["vision_hidden_size"], hidden_size=shape["hidden_size"], mlp_ratio=2)
    shared.update(
        hidden_size=shape["vision_hidden_size"],
        intermediate_size=2 * shape["vision_hidden_size"],
        out_hidden_size=shape["hidden_size"],
    )
    if family == "qwen2_5_vl":
        # Windows of 2 x 2 merged tokens, so window reordering really happens; the last block attends globally.
        return dict(shared, window_size=4 * patch_size, fullatt_block_indexes=[shape["vision_layers"] - 1])
    if family.startswith("qwen3_vl"):
        return dict(shared, num_position_embeddings=64, deepstack_visual_indexes=[0])
    if family.startswith("qwen3_5"):
        return dict(shared, num_position_embeddings=64)
    return dict(shared, image_size=8 * patch_size)  # GLM-4V: learned position embeddings on an 8 x 8 grid


@dataclass(frozen=True)
class MRopeFamily:
    """
    What distinguishes the tiny builds of the Qwen2-VL-like families (dynamic resolution, `image_grid_thw`,
    `mm_token_type_ids`, M-RoPE), which [`build_mrope_family`] builds.

    Args:
        config_class, model_class, processor_class (`type`):
            The family's config, `*ForConditionalGeneration` and (image-only) processor classes.
        tokens (`Mapping[str, str]`):
            The named special tokens (`{"image_token": ..., ...}`); the config gets each one's id as `<name>_id`.
        placeholder (`str`):
            What the chat template writes for an image.
        image_processor_class (`type`, *optional*, defaults to [`~transformers.Qwen2VLImageProcessorPil`]):
            The PIL image processor, built with `patch_size`, `merge_size=2`, `temporal_patch_size=2`, `size`.
        frames_in_pixel_limits (`int`, *optional*, defaults to `1`):
            How many frames the image processor counts in `min_pixels`/`max_pixels` (GLM-4V's counts its two
            temporal copies of an image).
        moe (`Mapping[str, int]`, *optional*):
            Text config fields of a mixture-of-experts decoder; its experts get `intermediate_size`.
        moe_widths (`tuple[str, ...]`, *optional*, defaults to `("moe_intermediate_size",)`):
            The text config fields that get `intermediate_size` in a mixture-of-experts decoder.
        text (`Mapping[str, object]`, *optional*):
            Other text config fields of the family (e.g. Qwen3.5's linear-attention layers).
        partial_rotary_factor (`float`, *optional*, defaults to `1.0`):
            The share of each head that is rotated (GLM-4.5V's stock config: 0.5); the M-RoPE sections split it.

    Example:

    ```python
    >>> from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    >>> from hf_sparse_mllm.tiny.qwen import IMAGE_PLACEHOLDER, QWEN_TOKENS, MRopeFamily, ImageOnlyQwen2VLProcessor
    >>> spec = MRopeFamily(Qwen2VLConfig, Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor, QWEN_TOKENS, IMAGE_PLACEHOLDER)
    >>> spec.frames_in_pixel_limits, spec.moe
    (1, None)
    ```
    """

    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    tokens: Mapping[str, str]
    placeholder: str
    image_processor_class: type = Qwen2VLImageProcessorPil
    frames_in_pixel_limits: int = 1
    moe: Mapping[str, int] | None = None
    moe_widths: tuple[str, ...] = ("moe_intermediate_size",)
    text: Mapping[str, object] | None = None
    partial_rotary_factor: float = 1.0


# Qwen3.5's Gated DeltaNet layers, tiny: every second decoder layer attends fully, the others are linear attention.
_QWEN3_5_LINEAR_ATTENTION = dict(
    full_attention_interval=2,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
_QWEN = {
    "qwen2_vl": MRopeFamily(
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor, QWEN_TOKENS, IMAGE_PLACEHOLDER
    ),
    "qwen2_5_vl": MRopeFamily(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        ImageOnlyQwen2_5_VLProcessor,
        QWEN_TOKENS,
        IMAGE_PLACEHOLDER,
    ),
    "qwen3_vl": MRopeFamily(
        Qwen3VLConfig, Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor, QWEN_TOKENS, IMAGE_PLACEHOLDER
    ),
    # The stock `Qwen3VLProcessor` too; 4 experts in every decoder layer, 2 per token.
    "qwen3_vl_moe": MRopeFamily(
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        ImageOnlyQwen3VLProcessor,
        QWEN_TOKENS,
        IMAGE_PLACEHOLDER,
        moe=dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
    ),
    "qwen3_5": MRopeFamily(
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        ImageOnlyQwen3VLProcessor,
        QWEN_TOKENS,
        IMAGE_PLACEHOLDER,
        text=_QWEN3_5_LINEAR_ATTENTION,
    ),
    "qwen3_5_moe": MRopeFamily(
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
        ImageOnlyQwen3VLProcessor,
        QWEN_TOKENS,
        IMAGE_PLACEHOLDER,
        moe=dict(num_experts=4, num_experts_per_tok=2),
        moe_widths=("moe_intermediate_size", "shared_expert_intermediate_size"),
        text=_QWEN3_5_LINEAR_ATTENTION,
    ),
}


def _build(family: str, words: Iterable[str], kwargs: QwenBuilderKwargs):
    return build_mrope_family(family, _QWEN[family], words, kwargs)


def build_mrope_family(family: str, spec: MRopeFamily, words: Iterable[str], kwargs: QwenBuilderKwargs):
    """
    Build the tiny model and processor of the Qwen2-VL-like `family` described by `spec` from a builder's `words`
    and `kwargs` (see [`build_tiny_qwen2_vl`] for the geometry they set).

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny.qwen import _QWEN, build_mrope_family
    >>> model, processor = build_mrope_family("qwen2_vl", _QWEN["qwen2_vl"], ["red"], {"hidden_size": 16})
    >>> model.config.text_config.hidden_size, model.config.text_config.rope_parameters["mrope_section"]
    (16, [2, 1, 1])
    ```
    """
    build = TinyBuild.of(family, kwargs, QwenBuilderKwargs)
    patch_size = kwargs.get("patch_size", 8)
    frames = spec.frames_in_pixel_limits
    min_pixels = kwargs.get("min_pixels", 32 * 32) * frames
    max_pixels = kwargs.get("max_pixels", 96 * 96) * frames
    hidden_size, num_attention_heads = build.shape["hidden_size"], build.shape["num_attention_heads"]
    head_dim = hidden_size // num_attention_heads
    rotary_dim = int(head_dim * spec.partial_rotary_factor)
    if rotary_dim % 8:
        factor = "" if spec.partial_rotary_factor == 1 else f" times {spec.partial_rotary_factor} (its rotary part)"
        raise ValueError(
            f"hidden_size // num_attention_heads{factor} must be a multiple of 8 for the M-RoPE sections, got "
            f"hidden_size={hidden_size}, num_attention_heads={num_attention_heads}"
        )
    tokenizer = build.tokenizer(words, spec.placeholder, named_special_tokens=spec.tokens)
    image_processor = spec.image_processor_class(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    processor = build.processor(spec.processor_class, image_processor, tokenizer)
    # M-RoPE splits the head's rotary frequencies (rotary_dim / 2) into temporal, height and width sections.
    quarter = rotary_dim // 8
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2 * quarter, quarter, quarter]}
    if spec.partial_rotary_factor != 1:
        rope_parameters["partial_rotary_factor"] = spec.partial_rotary_factor
    width = build.shape["intermediate_size"]
    moe = dict(spec.moe, **dict.fromkeys(spec.moe_widths, width)) if spec.moe else {}
    text = dict(build.text_config(tokenizer), head_dim=head_dim, rope_parameters=rope_parameters, **moe)
    config = spec.config_class(
        text_config=dict(text, **(spec.text or {})),
        vision_config=_vision_config(family, build, patch_size),
        **{f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in spec.tokens.items()},
        tie_word_embeddings=False,
    )
    return build.model(spec.model_class, config, tokenizer), processor

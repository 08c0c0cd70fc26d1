"""Tiny Idefics3 (`idefics3`) and SmolVLM (`smolvlm`): image splitting into tiles plus a global image.

Geometry (defaults, both families): 32 px tiles, 4 px patches, pixel-shuffle `scale_factor=2`, so every tile is 16
visual tokens. Images are resized so their longest edge is 64 px and split into tiles of 32 px (up to 2 x 2), plus
one downscaled global image: 5 tiles (80 tokens) for a 40 x 30 (width x height) image, 3 tiles (48 tokens) for
100 x 20. The image processors are [`~transformers.Idefics3ImageProcessorPil`] and
[`~transformers.SmolVLMImageProcessorPil`].

The chat template writes `<image>`; the processor expands it into one run of 16 `<image>` per tile, each tile
introduced by text tokens: `<fake_token_around_image><row_1_col_1><image> x 16<fake_token_around_image><row_1_col_2>
... <fake_token_around_image><global-img><image> x 16<fake_token_around_image>` (rows separated by newlines, which
the word tokenizer drops). The processors return `pixel_values` `(samples, max_tiles, 3, 32, 32)` and
`pixel_attention_mask` `(samples, max_tiles, 32, 32)`, zero-padded to the sample with most tiles (a text-only sample
is all padding): count real tiles with the mask, not with `pixel_values.shape[0]`.
`get_image_features(...).pooler_output` is a list with one tensor per batch row, its tiles' tokens flattened to
`(tiles * 16, hidden)` (`(0, hidden)` for a text-only row).

SmolVLM's stock processor holds a torchvision-only video processor and needs the `num2words` package even for
images; [`ImageOnlySmolVLMProcessor`] drops the video processor (see `register_processor` in `_common.py`), but
`num2words` must still be installed.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, register_processor
from .registry import register_tiny_family

# The processors look these up by name; 6 x 6 is the most tiles their prompts number.
IDEFICS_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    "video_token": "<video>",
}
ROW_COL_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]


class IdeficsBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of both builders: every builder's and the geometry of [`build_tiny_idefics3`]."""

    image_size: int
    patch_size: int
    longest_edge: int


@register_processor
class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """
    [`~transformers.SmolVLMProcessor`] without its video processor (see `register_processor`); its
    `apply_chat_template` skips the video sampling defaults SmolVLM's reads from that video processor.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_smolvlm
    >>> _, processor = build_tiny_smolvlm(words=["red"])
    >>> type(processor).__name__, processor.image_seq_len
    ('ImageOnlySmolVLMProcessor', 16)
    ```
    """

    def __init__(
        self, image_processor, tokenizer, image_seq_len: int = 169, chat_template: str | None = None, **kwargs
    ):
        super().__init__(
            image_processor,
            tokenizer,
            video_processor=None,
            image_seq_len=image_seq_len,
            chat_template=chat_template,
            **kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLMProcessor's override only adds video sampling defaults read from its video processor.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


_CLASSES = {
    "idefics3": (Idefics3ImageProcessorPil, Idefics3Processor, Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMImageProcessorPil, ImageOnlySmolVLMProcessor, SmolVLMConfig, SmolVLMForConditionalGeneration),
}


@register_tiny_family("idefics3")
def build_tiny_idefics3(
    *, words: Iterable[str], **kwargs: Unpack[IdeficsBuilderKwargs]
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """
    Build a tiny Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama decoder, image splitting) and its
    processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side of a tile and of the downscaled global image (the vision tower's input).
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower; `(image_size // patch_size) ** 2 / 4` visual tokens per tile.
        longest_edge (`int`, *optional*, defaults to `64`):
            Longest edge images are resized to before splitting (a multiple of `image_size`: at most
            `longest_edge // image_size` tiles per side).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_idefics3
    >>> model, processor = build_tiny_idefics3(words=["what", "color", "red"])
    >>> inputs = processor(text=["<image> what color ?"], images=[[Image.new("RGB", (40, 30))]], return_tensors="pt")
    >>> inputs["pixel_values"].shape, inputs["pixel_attention_mask"].shape
    (torch.Size([1, 5, 3, 32, 32]), torch.Size([1, 5, 32, 32]))
    >>> (inputs["input_ids"] == model.config.image_token_id).sum().item()
    80
    >>> processor.batch_decode(inputs["input_ids"][:, :3])
    ['<fake_token_around_image> <row_1_col_1> <image>']
    ```
    """
    return _build("idefics3", words, kwargs)


@register_tiny_family("smolvlm")
def build_tiny_smolvlm(
    *, words: Iterable[str], **kwargs: Unpack[IdeficsBuilderKwargs]
) -> tuple[SmolVLMForConditionalGeneration, ImageOnlySmolVLMProcessor]:
    """
    Build a tiny SmolVLM (Idefics3's architecture and tiling) and its image-only processor, offline.

    The arguments are those of [`build_tiny_idefics3`]. Needs the `num2words` package (SmolVLM's processor imports
    it for video prompts).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_smolvlm
    >>> model, processor = build_tiny_smolvlm(words=["red"])
    >>> inputs = processor(text=["<image> red"], images=[[Image.new("RGB", (100, 20))]], return_tensors="pt")
    >>> inputs["pixel_values"].shape, (inputs["input_ids"] == model.config.image_token_id).sum().item()
    (torch.Size([1, 3, 3, 32, 32]), 48)
    ```
    """
    return _build("smolvlm", words, kwargs)


def _build(family: str, words: Iterable[str], kwargs: IdeficsBuilderKwargs):
    build = TinyBuild.of(family, kwargs, IdeficsBuilderKwargs)
    image_size = kwargs.get("image_size", 32)
    patch_size = kwargs.get("patch_size", 4)
    longest_edge = kwargs.get("longest_edge", 64)
    scale_factor = 2
    if image_size % (patch_size * scale_factor):
        raise ValueError(
            f"image_size must be a multiple of 2 * patch_size (pixel shuffle by 2), got image_size={image_size}, "
            f"patch_size={patch_size}"
        )
    if longest_edge % image_size or longest_edge > 6 * image_size:
        raise ValueError(
            f"longest_edge must be a multiple of image_size={image_size} of at most 6 tiles, got {longest_edge}"
        )
    tokenizer = build.tokenizer(words, named_special_tokens=IDEFICS_TOKENS, extra_special_tokens=ROW_COL_TOKENS)
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor_class, processor_class, config_class, model_class = _CLASSES[family]
    image_processor = image_processor_class(
        do_image_splitting=True,
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": image_size},
    )
    processor = build.processor(processor_class, image_processor, tokenizer, image_seq_len=image_seq_len)
    config = config_class(
        vision_config=build.vision_config(image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(**build.text_config(tokenizer)),
        image_token_id=processor.image_token_id,
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    return build.model(model_class, config, tokenizer), processor

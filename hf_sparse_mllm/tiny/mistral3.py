"""Tiny Mistral 3 (`mistral3`, Mistral-Small-3.1 style): Pixtral tower, 2 x 2 patch merger, Mistral decoder.

Geometry (defaults): 4 px patches merged 2 x 2 (8 px per visual token), images resized by
[`~transformers.PixtralImageProcessorPil`] so that their longest edge is at most 48 px, then each side rounded up
to a multiple of 8: a 40 x 30 (width x height) image becomes 40 x 32, 4 rows of 5 visual tokens (20), a 30 x 60
image 24 x 48, 6 rows of 3 (18). `pixel_values` is `(images, 3, max_height, max_width)`, zero-padded to the
batch's largest image, and `image_sizes` `(images, 2)` holds each image's (height, width) after resizing.

In `input_ids` each image is `[IMG] x cols [IMG_BREAK]` per row, the last row ending in `[IMG_END]` instead: one
placeholder span per image row, with the two separators as ordinary tokens of their own. Only `[IMG]` is the image
token the features replace (`processor.image_token_id == model.config.image_token_id`).
`get_image_features(...).pooler_output` is a tuple with one `(rows * cols, hidden)` tensor per image, in raster
order (the merger unfolds each image's patch grid row by row).

The processor is [`TinyPixtralProcessor`]: `transformers`' `PixtralProcessor` cannot be built without torchvision in
5.24 (its module imports the torchvision image processor and the class requires the torchvision backend), so this
one expands the placeholders the same way over [`~transformers.PixtralImageProcessorPil`].
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
    ProcessorMixin,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, register_processor
from .registry import register_tiny_family

MISTRAL3_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


@register_processor
class TinyPixtralProcessor(ProcessorMixin):
    """
    A torchvision-free processor with `PixtralProcessor`'s placeholder expansion: each `[IMG]` in the text becomes
    `[IMG] x cols [IMG_BREAK]` per row of visual tokens, the last `[IMG_BREAK]` replaced by `[IMG_END]`, with rows
    and cols the resized image's sides divided by `patch_size * spatial_merge_size`. It returns `input_ids`,
    `attention_mask`, `pixel_values` and `image_sizes`, and saves and reloads with `AutoProcessor`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import TinyPixtralProcessor, build_tiny_mistral3
    >>> _, processor = build_tiny_mistral3(words=["red"])
    >>> isinstance(processor, TinyPixtralProcessor), processor.get_attributes()
    (True, ['image_processor', 'tokenizer'])
    >>> inputs = processor(text=["[IMG] red"], images=[Image.new("RGB", (30, 60))])
    >>> processor.tokenizer.decode(inputs["input_ids"][0][-3:])  # the last row of 3 tokens ends the image
    '[IMG] [IMG_END] red'
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template=None,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token = image_token, image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images, **images_kwargs):
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        side = self.patch_size * self.spatial_merge_size
        height, width = (int(x) for x in image_inputs["image_sizes"][image_idx])
        row = self.image_token * (width // side)
        return self.image_break_token.join([row] * (height // side)) + self.image_end_token

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


class Mistral3BuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of [`build_tiny_mistral3`]: every builder's and its image geometry."""

    longest_edge: int
    patch_size: int
    spatial_merge_size: int


@register_tiny_family("mistral3")
def build_tiny_mistral3(
    *, words: Iterable[str], **kwargs: Unpack[Mistral3BuilderKwargs]
) -> tuple[Mistral3ForConditionalGeneration, TinyPixtralProcessor]:
    """
    Build a tiny Mistral 3 (Pixtral vision tower, patch merger, Mistral decoder) and its processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        longest_edge (`int`, *optional*, defaults to `48`):
            Longest edge (px) images are resized down to; also the tower's `image_size`.
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower.
        spatial_merge_size (`int`, *optional*, defaults to `2`):
            Side of the patch blocks the merger turns into one visual token.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_mistral3
    >>> model, processor = build_tiny_mistral3(words=["red"])
    >>> image = Image.new("RGB", (40, 30))  # resized to 40 x 32: 4 rows of 5 visual tokens
    >>> inputs = processor(text=["[IMG] red"], images=[image], return_tensors="pt")
    >>> inputs["image_sizes"].tolist(), (inputs["input_ids"] == model.config.image_token_id).sum().item()
    ([[32, 40]], 20)
    >>> processor.tokenizer.decode(inputs["input_ids"][0, :8])
    '[IMG] [IMG] [IMG] [IMG] [IMG] [IMG_BREAK] [IMG] [IMG]'
    ```
    """
    build = TinyBuild.of("mistral3", kwargs, Mistral3BuilderKwargs)
    longest_edge = kwargs.get("longest_edge", 48)
    patch_size, merge = kwargs.get("patch_size", 4), kwargs.get("spatial_merge_size", 2)
    tokenizer = build.tokenizer(words, MISTRAL3_TOKENS["image_token"], named_special_tokens=MISTRAL3_TOKENS)
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": longest_edge}, patch_size={"height": patch_size, "width": patch_size}
    )
    processor = build.processor(
        TinyPixtralProcessor, image_processor, tokenizer, patch_size=patch_size, spatial_merge_size=merge
    )
    vision = build.vision_config(image_size=longest_edge, patch_size=patch_size)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**vision, head_dim=vision["hidden_size"] // vision["num_attention_heads"]),
        text_config=MistralConfig(**build.text_config(tokenizer), sliding_window=None),
        image_token_index=processor.image_token_id,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return build.model(Mistral3ForConditionalGeneration, config, tokenizer), processor

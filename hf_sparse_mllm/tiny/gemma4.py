"""Tiny Gemma 4 (`gemma4`): variable-resolution vision tower whose patches are average-pooled k x k into visual tokens,
Gemma 4 decoder with sliding and global layers and bidirectional attention inside each image.

Geometry (defaults): 4 px patches pooled 2 x 2 (8 px per visual token). [`~transformers.Gemma4ImageProcessorPil`]
resizes every image, keeping its aspect ratio, to the largest multiple of 8 px per side with at most
`max_soft_tokens * 4` patches (`max_soft_tokens=70`, the smallest budget it accepts): a 40 x 30 (width x height)
image becomes 72 x 56, 7 rows of 9 visual tokens (63), a 30 x 60 image 40 x 88, 11 rows of 5 (55). `pixel_values` is
`(images, 280, 3 * 4 * 4)`: each image's patches in raster order, zero-padded to `max_soft_tokens * 4` patches, and
`image_position_ids` `(images, 280, 2)` holds each patch's `(x, y)`, `(-1, -1)` on the padding. The tower pools
patch `(x, y)` into token `(y // 2) * (width // 2) + x // 2` (raster order over the pooled grid), and
`get_image_features(...).pooler_output` is a tuple with one `(tokens, hidden)` tensor per image.

The chat template writes `<|image|>` for an image; the processor expands it to `<|image> <|image|> x tokens <image|>`
(start, soft tokens, end), so `processor.image_token_id == model.config.image_token_id` is the soft token. It returns
`mm_token_type_ids` (1 at the soft tokens), from which the model builds bidirectional attention inside each image in
its sliding-window layers (`use_bidirectional_attention="vision"`; its global layers stay causal). The decoder
alternates a sliding-window layer (window of 96 tokens: longer than an image, shorter than a two-image sample) and a
global one, the last layer global, with per-layer input embeddings (8 per layer) as in Gemma 4 E2B/E4B.

The processor is [`ImageOnlyGemma4Processor`]: the stock `Gemma4Processor` also holds an audio feature extractor
and a torchvision-only video processor.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    ProcessorMixin,
)

from ._common import TinyBuild, TinyBuilderKwargs, Unpack, register_processor
from .registry import register_tiny_family

GEMMA4_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "video_token": "<|video|>",
    # `Gemma4Processor` refuses every call when its tokenizer has no audio start and end tokens.
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}


class _WithoutAudioAndVideo(ProcessorMixin):
    """
    Drops the `feature_extractor` and `video_processor` that `Gemma4Processor.__init__` passes on (as `None`): after
    `Gemma4Processor` in [`ImageOnlyGemma4Processor`]'s bases, it is what that `__init__`'s `super().__init__` calls,
    before `ProcessorMixin.__init__`, which refuses sub-processors its class's `__init__` does not name.
    """

    def __init__(self, *args, feature_extractor=None, video_processor=None, **kwargs):
        super().__init__(*args, **kwargs)


@register_processor
class ImageOnlyGemma4Processor(Gemma4Processor, _WithoutAudioAndVideo):
    """
    [`~transformers.Gemma4Processor`] without its audio feature extractor and video processor: it builds and reloads
    without torchvision (see `register_processor`) and processes images and text exactly like the stock class (calls
    with `videos=` or `audio=` are not supported).

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_tiny_gemma4
    >>> _, processor = build_tiny_gemma4(words=["red"], num_hidden_layers=1)
    >>> type(processor).__name__, processor.get_attributes()
    ('ImageOnlyGemma4Processor', ['image_processor', 'tokenizer'])

    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 280,
        audio_seq_length: int = 750,
        audio_ms_per_token: int = 40,
        **kwargs,
    ):
        super().__init__(
            None,
            image_processor,
            tokenizer,
            None,
            chat_template=chat_template,
            image_seq_length=image_seq_length,
            audio_seq_length=audio_seq_length,
            audio_ms_per_token=audio_ms_per_token,
            **kwargs,
        )


class Gemma4BuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of [`build_tiny_gemma4`]: every builder's, its image geometry and its sliding window."""

    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int
    sliding_window: int


@register_tiny_family("gemma4")
def build_tiny_gemma4(
    *, words: Iterable[str], **kwargs: Unpack[Gemma4BuilderKwargs]
) -> tuple[Gemma4ForConditionalGeneration, ImageOnlyGemma4Processor]:
    """
    Build a tiny Gemma 4 (variable-resolution tower with k x k average pooling, Gemma 4 decoder with sliding and
    global layers and bidirectional image attention) and its image-only processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`]; `hidden_size // num_attention_heads` is the head width of every layer (global
    ones included).

    Args:
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower.
        pooling_kernel_size (`int`, *optional*, defaults to `2`):
            Side `k` of the square of patches average-pooled into one visual token, at least 2 (stock Gemma 4: 3).
        max_soft_tokens (`int`, *optional*, defaults to `70`):
            Most visual tokens per image, one of `Gemma4ImageProcessorPil`'s budgets (70, 140, 280, 560, 1120):
            every image is resized to nearly fill it.
        sliding_window (`int`, *optional*, defaults to `96`):
            Attention window of the sliding-window decoder layers (every other layer, starting with the first).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_gemma4
    >>> model, processor = build_tiny_gemma4(words=["what", "color", "red"])
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    >>> text = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> text
    '<s> user : <|image|> what color ? assistant :'
    >>> inputs = processor(text=[text], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    >>> sorted(inputs)
    ['attention_mask', 'image_position_ids', 'input_ids', 'mm_token_type_ids', 'pixel_values']
    >>> processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, 3:6].tolist())
    ['<|image>', '<|image|>', '<|image|>']
    >>> (inputs["input_ids"] == model.config.image_token_id).sum().item(), inputs["mm_token_type_ids"].sum().item()
    (63, 63)
    >>> features = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    >>> [f.shape for f in features.pooler_output], inputs["image_position_ids"][0].amax(0).tolist()  # largest (x, y)
    ([torch.Size([63, 32])], [17, 13])

    ```
    """
    build = TinyBuild.of("gemma4", kwargs, Gemma4BuilderKwargs)
    patch_size = kwargs.get("patch_size", 4)
    kernel = kwargs.get("pooling_kernel_size", 2)
    max_soft_tokens = kwargs.get("max_soft_tokens", 70)
    sliding_window = kwargs.get("sliding_window", 96)
    if kernel < 2:
        # With nothing to pool, `Gemma4VisionPooler` returns the padding mask where the vision model expects the mask
        # of real tokens, so the tower keeps the padding patches (transformers 5.24).
        raise ValueError(f"pooling_kernel_size must be at least 2, got {kernel}")
    tokenizer = build.tokenizer(words, GEMMA4_TOKENS["image_token"], named_special_tokens=GEMMA4_TOKENS)
    image_processor = Gemma4ImageProcessorPil(
        patch_size=patch_size, pooling_kernel_size=kernel, max_soft_tokens=max_soft_tokens
    )
    processor = build.processor(ImageOnlyGemma4Processor, image_processor, tokenizer, image_seq_length=max_soft_tokens)
    shape = build.shape
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    num_layers = shape["num_hidden_layers"]
    text_config = Gemma4TextConfig(
        **build.text_config(tokenizer),
        head_dim=head_dim,
        global_head_dim=head_dim,
        sliding_window=sliding_window,
        # Gemma 4 needs its last layer global.
        layer_types=[
            "full_attention" if i % 2 or i == num_layers - 1 else "sliding_attention" for i in range(num_layers)
        ],
        use_bidirectional_attention="vision",
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=8,
    )
    vision_config = Gemma4VisionConfig(
        hidden_size=shape["vision_hidden_size"],
        intermediate_size=2 * shape["vision_hidden_size"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"],
        head_dim=shape["vision_hidden_size"] // shape["num_attention_heads"],
        patch_size=patch_size,
        pooling_kernel_size=kernel,
        # Patch coordinates index the position table: the longest side of an image is max_soft_tokens x k patches.
        position_embedding_size=max_soft_tokens * kernel,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA4_TOKENS.items()}
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        video_token_id=ids["video_token"],
        audio_token_id=ids["audio_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        tie_word_embeddings=False,
    )
    return build.model(Gemma4ForConditionalGeneration, config, tokenizer), processor

"""Tiny Gemma 3 (`gemma3`) and PaliGemma (`paligemma`): SigLIP tower, Gemma decoder, a fixed number of tokens per image.

- Gemma 3: 32 px images, 4 px patches (64 patches) average-pooled to `mm_tokens_per_image=16` visual tokens per
  image, whatever its size (pan-and-scan is off). [`~transformers.Gemma3ImageProcessorPil`]. The chat template
  writes `<start_of_image>`; the processor expands it to `<start_of_image> <image_soft_token> x 16 <end_of_image>`
  (inside blank lines, which the word tokenizer drops), so `processor.image_token_id` is the start token while
  `model.config.image_token_id` is the soft token the features replace. The processor returns `token_type_ids`
  (1 at the soft tokens; `Gemma3Processor` renames the `mm_token_type_ids` of other processors), from which the model
  builds bidirectional attention inside each image. The decoder alternates a sliding-window layer (window of 32
  tokens, shorter than a two-image sample) and a global one.
- PaliGemma: 32 px images, 8 px patches, 16 visual tokens per image, [`~transformers.SiglipImageProcessorPil`]. Its
  processor puts `<s>` after the last `<image>` of a sample itself (the chat template writes no `<s>`), adds `"\\n"`
  at the end and refuses a batch without images (a text-only sample beside one with an image passes). The inserted `<s>` is not counted in the
  character offsets that map the template's `{% generation %}` span to tokens, so
  `apply_chat_template(..., return_assistant_tokens_mask=True)` (and TRL's `assistant_only_loss`) marks a span
  shifted by `len("<s>")` characters: it starts on the template's `assistant :`. It returns `token_type_ids` and `labels`,
  both computed from a `suffix=` argument: without one (a chat template holds the answer in the text)
  `token_type_ids` are all 0, so the whole sample, answer included, is the model's bidirectional prefix and every
  position sees the answer. A training collator must pass the answer as `suffix` (as
  [`~hf_sparse_mllm.data.collator.VisionLanguageCollator`] does) for PaliGemma's prefix-LM to be causal there. Without `token_type_ids` the model is not reliably causal
  either: `PaliGemmaConfig` sets the decoder's `use_bidirectional_attention=True`, and with SDPA and no padded
  position no mask is built, so attention is bidirectional; eager attention, or any padding, makes it causal.

`get_image_features(...).pooler_output` is a tensor `(images, 16, hidden)` for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from ._common import SquareImageBuilderKwargs, TinyBuild, Unpack, check_patch_size
from .registry import register_tiny_family

GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "image_token": "<image_soft_token>",
    "eoi_token": "<end_of_image>",
}


class Gemma3BuilderKwargs(SquareImageBuilderKwargs, total=False):
    """The keyword arguments of [`build_tiny_gemma3`]: every builder's, its image geometry and its sliding window."""

    mm_tokens_per_image: int
    sliding_window: int


@register_tiny_family("gemma3")
def build_tiny_gemma3(
    *, words: Iterable[str], **kwargs: Unpack[Gemma3BuilderKwargs]
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """
    Build a tiny Gemma 3 (SigLIP tower, pooled projector, Gemma 3 decoder with sliding and global layers) and its
    processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side of the square images fed to the vision tower (every image is resized to it: no pan-and-scan).
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower.
        mm_tokens_per_image (`int`, *optional*, defaults to `16`):
            Visual tokens per image after average pooling: a square whose side divides `image_size // patch_size`.
        sliding_window (`int`, *optional*, defaults to `32`):
            Attention window of the sliding-window decoder layers (every other layer, starting with the first).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_gemma3
    >>> model, processor = build_tiny_gemma3(words=["what", "color", "red"])
    >>> processor.tokenizer.convert_ids_to_tokens([processor.image_token_id, model.config.image_token_id])
    ['<start_of_image>', '<image_soft_token>']
    >>> inputs = processor(text=["<start_of_image> what color ?"], images=[[Image.new("RGB", (40, 30))]], return_tensors="pt")
    >>> sorted(inputs), inputs["token_type_ids"].sum().item()
    (['attention_mask', 'input_ids', 'pixel_values', 'token_type_ids'], 16)
    >>> model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.shape
    torch.Size([1, 16, 32])
    ```
    """
    build = TinyBuild.of("gemma3", kwargs, Gemma3BuilderKwargs)
    image_size = kwargs.get("image_size", 32)
    patch_size = kwargs.get("patch_size", 4)
    mm_tokens_per_image = kwargs.get("mm_tokens_per_image", 16)
    sliding_window = kwargs.get("sliding_window", 32)
    side, patches_per_side = math.isqrt(mm_tokens_per_image), image_size // patch_size
    if side * side != mm_tokens_per_image or patches_per_side % side:
        raise ValueError(
            f"mm_tokens_per_image must be a square whose side divides image_size // patch_size = {patches_per_side}, "
            f"got {mm_tokens_per_image}"
        )
    check_patch_size(image_size, patch_size)
    tokenizer = build.tokenizer(words, GEMMA3_TOKENS["boi_token"], named_special_tokens=GEMMA3_TOKENS)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = build.processor(Gemma3Processor, image_processor, tokenizer, image_seq_length=mm_tokens_per_image)
    head_dim = build.shape["hidden_size"] // build.shape["num_attention_heads"]
    layers = range(build.shape["num_hidden_layers"])
    text_config = Gemma3TextConfig(
        **build.text_config(tokenizer),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in layers],
    )
    vision_config = SiglipVisionConfig(**build.vision_config(image_size=image_size, patch_size=patch_size))
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    return build.model(Gemma3ForConditionalGeneration, config, tokenizer), processor


@register_tiny_family("paligemma")
def build_tiny_paligemma(
    *, words: Iterable[str], **kwargs: Unpack[SquareImageBuilderKwargs]
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """
    Build a tiny PaliGemma (SigLIP tower, linear projector, Gemma decoder with a prefix-LM mask) and its processor,
    offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`].

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side of the square images fed to the vision tower.
        patch_size (`int`, *optional*, defaults to `8`):
            Patch side of the vision tower; `(image_size // patch_size) ** 2` visual tokens per image.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_paligemma
    >>> model, processor = build_tiny_paligemma(words=["what", "color", "red"])
    >>> len(processor.tokenizer), model.config.text_config.vocab_size  # 1,152 of them location and segmentation words
    (1195, 1195)
    >>> inputs = processor(text=["<image> what color ?"], images=[[Image.new("RGB", (40, 30))]], return_tensors="pt")
    >>> processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, 15:])
    ['<image>', '<s>', 'what', 'color', '?']
    >>> inputs["token_type_ids"].sum().item()  # no suffix: everything is the bidirectional prefix
    0
    ```
    """
    build = TinyBuild.of("paligemma", kwargs, SquareImageBuilderKwargs)
    image_size = kwargs.get("image_size", 32)
    patch_size = kwargs.get("patch_size", 8)
    check_patch_size(image_size, patch_size)
    tokenizer = build.tokenizer(words, bos=False)
    num_tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_seq_length=num_tokens
    )
    # PaliGemma's processor adds 1,152 location and segmentation words to the tokenizer: count them in the vocabulary.
    processor = build.processor(PaliGemmaProcessor, image_processor, tokenizer)
    hidden_size = build.shape["hidden_size"]
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**build.vision_config(image_size=image_size, patch_size=patch_size)),
        text_config=GemmaConfig(
            **build.text_config(tokenizer), head_dim=hidden_size // build.shape["num_attention_heads"]
        ),
        image_token_index=processor.image_token_id,
        projection_dim=hidden_size,
        tie_word_embeddings=False,
    )
    return build.model(PaliGemmaForConditionalGeneration, config, tokenizer), processor

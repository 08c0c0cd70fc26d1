"""Batched greedy generation for conversational vision-language samples, with full or compressed visual tokens.

The evaluator, the `lmms_eval` plugin and the demo all generate through [`generate_answers`] (samples in TRL's
conversational format) or [`generate_from_prompts`] (already rendered prompts), so the three agree on prompts,
padding, decoding and the compressed-inference path.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..adapters import get_adapter
from ..compressors import TokenCompressor, check_keep_ratio, check_num_keep, get_compressor
from ..data.collator import prompt_text
from ..sparse_forward import Compression, compress_batch, sparse_hooks

# Seed of the generator handed to stochastic compressors at inference, so compressed evaluation is reproducible.
INFERENCE_SELECTION_SEED = 0


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The turns that make the prompt: everything before the last assistant turn (the reference answer), if any.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.generation import prompt_messages
    >>> prompt_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    [{'role': 'user', 'content': 'hi'}]

    ```
    """
    messages = list(messages)
    if not messages:
        raise ValueError("A sample has no messages; expected at least one user turn.")
    if messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("A sample's messages hold only an assistant turn; expected a user turn to prompt with.")
    return messages


def messages_from_context(context: str, num_images: int, image_marker: str = "<image>") -> list[dict]:
    """The one-turn conversation lmms-eval-style tasks prompt with: the images, then the task's text.

    `context` is what a task's `doc_to_text` returns (pre prompt + question + post prompt). Where it already holds
    `image_marker`s (one per image), the images go there instead, so a prompt can interleave text and images.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.generation import messages_from_context
    >>> messages_from_context("what color ?", 1)
    [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'what color ?'}]}]

    ```
    """
    pieces = context.split(image_marker) if image_marker and image_marker in context else None
    content: list[dict] = []
    if pieces is not None and len(pieces) - 1 == num_images:
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
    else:
        if pieces is not None:
            raise ValueError(
                f"The prompt holds {len(pieces) - 1} {image_marker!r} markers but the sample has {num_images} images."
            )
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": context}]
    return [{"role": "user", "content": content}]


def length_sort_key(tokenizer, context: str) -> tuple[int, str]:
    """Batching order of prompts: longest first (little padding, memory errors early), then by text.

    lmms-eval's models sort their requests the same way; sharing the key means the built-in evaluator and the
    lmms-eval plugin put the same prompts in the same batches.
    """
    return -len(tokenizer(context, add_special_tokens=False)["input_ids"]), context


def render_prompt(processor, messages: Sequence[dict]) -> str:
    """Render the prompt turns of `messages` with the processor's chat template and the generation prompt (a
    prefix-LM processor without one: see [`~hf_sparse_mllm.data.collator.prompt_text`]), as the training collator
    does."""
    return prompt_text(processor, prompt_messages(messages))


def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a `datasets` image dict (`bytes`/`path`), a path or raw bytes."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path") is not None:
            image = image["path"]
        else:
            raise ValueError("An image dict has neither 'bytes' nor 'path'.")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, str):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Cannot read an image from a {type(image).__name__}; pass PIL images, bytes or paths.")
    return image.convert("RGB") if image.mode != "RGB" else image


def sample_images(sample: dict) -> list[Image.Image]:
    """The images of a sample: its `images` list (TRL's format) or its single `image`."""
    if "images" in sample:
        images = sample["images"] or []
    else:
        images = [] if sample.get("image") is None else [sample["image"]]
    return [to_pil(image) for image in images]


def resolve_compression(model, token_compressor, keep_ratio=None, num_keep=None) -> Compression | None:
    """Validate a compressed-inference setting; return its [`~hf_sparse_mllm.sparse_forward.Compression`] (seeded,
    no mode isolator), or `None` for full tokens.

    Args:
        model (`PreTrainedModel`): the unwrapped model (it needs an architecture adapter to be compressed).
        token_compressor (`str`, [`~hf_sparse_mllm.compressors.TokenCompressor`] or `None`): registry name or instance.
        keep_ratio (`float`, *optional*): fraction of visual tokens kept per visual unit, in (0, 1].
        num_keep (`int`, *optional*): visual tokens kept per unit (capped at its size); overrides `keep_ratio`.
    """
    if token_compressor is None:
        if keep_ratio is not None and keep_ratio != 1.0 or num_keep is not None:
            raise ValueError(
                f"keep_ratio={keep_ratio} / num_keep={num_keep} need a token_compressor (e.g. 'divprune'); "
                "pass token_compressor=None without them for full visual tokens."
            )
        return None
    compressor = token_compressor
    if not isinstance(compressor, TokenCompressor):
        compressor = get_compressor(token_compressor)
    if keep_ratio is None and num_keep is None:
        raise ValueError(
            f"token_compressor={compressor.name!r} needs keep_ratio (in (0, 1]) or num_keep (visual tokens per image)."
        )
    get_adapter(model)  # a model without an adapter fails here, before any generation
    if num_keep is not None:
        check_num_keep(num_keep)
    else:
        check_keep_ratio(keep_ratio)
    return Compression(compressor, 1.0 if keep_ratio is None else keep_ratio, num_keep, INFERENCE_SELECTION_SEED)


@contextlib.contextmanager
def compressed_inputs(model, inputs: dict, compression: Compression | None, stats: dict | None = None):
    """Yield `inputs` ready for a forward or `generate` call with `compression` (the same sparse forward as a fast
    training step, without the isolator); `inputs` unchanged for full tokens. `stats`, when given, accumulates
    `images`, `visual_tokens` and `kept_visual_tokens`."""
    adapter = get_adapter(model) if compression is not None or stats is not None else None
    layout = adapter.layout(inputs) if adapter is not None else None
    if stats is not None:
        full = sum(run.length for run in layout.runs)
        stats["images"] = stats.get("images", 0) + layout.num_images
        stats["visual_tokens"] = stats.get("visual_tokens", 0) + full
    if compression is None:
        if stats is not None:
            stats["kept_visual_tokens"] = stats.get("kept_visual_tokens", 0) + full
        yield inputs
        return
    batch = compress_batch(adapter, inputs, compression, layout)
    if stats is not None:
        stats["kept_visual_tokens"] = stats.get("kept_visual_tokens", 0) + sum(batch.kept)
    # M-RoPE models decode from the prompt's last (full-sequence) position: `generate` continues the position ids.
    with sparse_hooks(adapter, batch, compression):
        yield batch.inputs


@torch.inference_mode()
def generate_from_prompts(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    *,
    max_new_tokens: int = 8,
    token_compressor: str | TokenCompressor | None = None,
    keep_ratio: float | None = None,
    num_keep: int | None = None,
    generation_kwargs: dict | None = None,
    stats: dict | None = None,
) -> list[str]:
    """Greedy-decode one batch of rendered prompts (left padded); return the decoded, stripped continuations.

    Args:
        model (`PreTrainedModel`): a vision-language model with `generate` (e.g. `LlavaForConditionalGeneration`).
        processor (`ProcessorMixin`): its processor; `prompts` were rendered with its chat template.
        prompts (`Sequence[str]`): one rendered prompt per sample (image placeholders not yet expanded).
        images (`Sequence[Sequence[PIL.Image.Image]]`): the images of each sample, in placeholder order.
        max_new_tokens (`int`, *optional*, defaults to `8`): generation limit.
        token_compressor, keep_ratio, num_keep: see [`generate_answers`].
        generation_kwargs (`dict`, *optional*): more `generate` arguments (e.g. `stop_strings`); sampling stays off.
        stats (`dict`, *optional*): accumulates `images`, `visual_tokens` and `kept_visual_tokens` of the batch.

    Returns:
        `list[str]`: one answer per prompt.
    """
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts but {len(images)} image lists; pass one image list per prompt.")
    if not prompts:
        return []
    compression = resolve_compression(model, token_compressor, keep_ratio, num_keep)
    tokenizer = getattr(processor, "tokenizer", processor)
    # Nested per sample: several processors (Gemma 3, SmolVLM) cannot split a flat list between prompts.
    nested_images = [list(sample) for sample in images] if any(len(sample) for sample in images) else None
    bos = getattr(tokenizer, "bos_token", None)
    # A template that writes the BOS token itself must not get a second one from the tokenizer.
    add_special_tokens = not (bos and all(prompt.startswith(bos) for prompt in prompts))
    inputs = processor(
        text=list(prompts),
        images=nested_images,
        padding=True,
        padding_side="left",
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {
        key: (value.to(device, dtype) if torch.is_floating_point(value) else value.to(device))
        for key, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }
    kwargs = dict(generation_kwargs or {})
    kwargs.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if kwargs.get("stop_strings"):
        kwargs.setdefault("tokenizer", tokenizer)

    with compressed_inputs(model, inputs, compression, stats) as inputs:
        output = model.generate(**inputs, **kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.inference_mode()
def continuation_logprob(
    model,
    processor,
    prompt: str,
    images: Sequence[Image.Image],
    continuation: str,
    *,
    token_compressor: str | TokenCompressor | None = None,
    keep_ratio: float | None = None,
    num_keep: int | None = None,
) -> tuple[float, bool]:
    """Log-probability of `continuation` after a rendered `prompt`, and whether greedy decoding would produce it.

    The continuation is tokenized on its own (no special tokens) and appended to the prompt's tokens, so its tokens
    are the ones the model would have to generate after the generation prompt.

    Returns:
        `tuple[float, bool]`: the summed log-probability of the continuation's tokens and whether every one of them
        is the arg-max token (lmms-eval's `loglikelihood` contract).
    """
    compression = resolve_compression(model, token_compressor, keep_ratio, num_keep)
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    inputs = processor(
        text=[prompt],
        images=[list(images)] if images else None,
        add_special_tokens=not (bos and prompt.startswith(bos)),
        return_tensors="pt",
    )
    target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if target.shape[1] == 0:
        raise ValueError(f"The continuation {continuation!r} has no tokens.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    batch["input_ids"] = torch.cat([batch["input_ids"], target], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch = {
        key: (value.to(device, dtype) if torch.is_floating_point(value) else value.to(device))
        for key, value in batch.items()
    }
    n = target.shape[1]
    with compressed_inputs(model, batch, compression) as batch:
        logits = model(**batch, use_cache=False).logits
    logits = logits[0, -n - 1 : -1].float()
    target = target[0].to(logits.device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    return float(logprobs.sum()), bool((logits.argmax(-1) == target).all())


def generate_answers(
    model,
    processor,
    samples,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    token_compressor: str | TokenCompressor | None = None,
    keep_ratio: float | None = None,
    num_keep: int | None = None,
    progress: bool = True,
    generation_kwargs: dict | None = None,
) -> list[str]:
    """
    Answer conversational samples with batched greedy generation, with all visual tokens or compressed ones.

    Each sample's prompt is its user turn(s) rendered with the processor's chat template and the generation prompt;
    a trailing assistant turn (the reference answer) is left out. Batches are left padded and the attention mask is
    passed to `generate`. With `token_compressor` set, every image's placeholder span is shrunk to the kept budget
    `k` and the compressor runs on the projector output during the prefill (no mode isolator): this is sparse
    inference, and comparing it with full inference measures the training-inference mismatch.

    Args:
        model (`PreTrainedModel`):
            An unwrapped vision-language model with `generate`; used as it is (call `model.eval()` first).
        processor (`ProcessorMixin`):
            Its processor (with a chat template).
        samples (`Sequence[dict]` or `datasets.Dataset`):
            Samples with `messages` (TRL conversational format) and `images` (a list; or a single `image`).
        batch_size (`int`, *optional*, defaults to `32`):
            Samples per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to `8`):
            Most tokens generated per answer.
        token_compressor (`str` or [`~hf_sparse_mllm.compressors.TokenCompressor`], *optional*):
            A registered compressor name (e.g. `"divprune"`) for compressed inference; `None` keeps every token.
        keep_ratio (`float`, *optional*):
            Fraction of visual tokens kept per image, in (0, 1]; needs `token_compressor`.
        num_keep (`int`, *optional*):
            Absolute number of visual tokens kept per image; overrides `keep_ratio`.
        progress (`bool`, *optional*, defaults to `True`):
            Show a `tqdm` progress bar over batches.
        generation_kwargs (`dict`, *optional*):
            More `generate` arguments; decoding stays greedy.

    Returns:
        `list[str]`: the decoded answers, stripped, in sample order.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.evaluation import generate_answers
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> model, processor = build_tiny_llava_and_processor("test", words=["what", "color", "red", "blue"])
    >>> sample = {"images": [Image.new("RGB", (32, 32), "red")],
    ...           "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]}
    >>> full = generate_answers(model, processor, [sample, sample], max_new_tokens=3, progress=False)
    >>> sparse = generate_answers(model, processor, [sample, sample], max_new_tokens=3, progress=False,
    ...                           token_compressor="divprune", keep_ratio=0.25)
    >>> len(full), len(sparse), all(isinstance(answer, str) for answer in full + sparse)
    (2, 2, True)

    ```
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}.")
    # Fails before any generation on a bad compressor or budget.
    resolve_compression(model, token_compressor, keep_ratio, num_keep)
    n = len(samples)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    answers: list[str] = []
    for start in starts:
        batch = [samples[i] for i in range(start, min(start + batch_size, n))]
        for i, sample in enumerate(batch):
            if "messages" not in sample:
                raise ValueError(
                    f"Sample {start + i} has no 'messages' (keys: {sorted(sample)}); generate_answers expects TRL's "
                    "conversational format: {'images': [...], 'messages': [{'role': 'user', 'content': ...}]}."
                )
        answers += generate_from_prompts(
            model,
            processor,
            [render_prompt(processor, sample["messages"]) for sample in batch],
            [sample_images(sample) for sample in batch],
            max_new_tokens=max_new_tokens,
            token_compressor=token_compressor,
            keep_ratio=keep_ratio,
            num_keep=num_keep,
            generation_kwargs=generation_kwargs,
        )
    return answers


__all__ = [
    "continuation_logprob",
    "generate_answers",
    "generate_from_prompts",
    "length_sort_key",
    "messages_from_context",
    "prompt_messages",
    "render_prompt",
    "resolve_compression",
    "sample_images",
    "to_pil",
]

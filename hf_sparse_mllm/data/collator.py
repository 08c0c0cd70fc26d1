"""Data collator for conversational vision-language samples in TRL's format, for every model family."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from transformers import PaliGemmaProcessor, ProcessorMixin

from .samples import SAMPLE_ERROR_KEY, SAMPLE_INDEX_KEY, BadSample, BadSampleError, describe_image, load_image

logger = logging.getLogger(__name__)

SKIPPED_SAMPLES_KEY = "sparse_skipped_samples"
"""Batch key of the number of samples a `skip_bad_samples=True` collator dropped (a 0-d int64 tensor). It is not a
model input: the trainer pops it before the forward and sums it across processes."""


class VisionLanguageCollator:
    """
    Collate TRL conversational samples (`{"images": [...], "messages": [...]}`) into the model's own forward inputs,
    with only the assistant answers trained, for every vision-language family.

    A wrapper around TRL's [`~trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling`] with
    `assistant_only_loss=True`: TRL renders the chat template, inserts the images, expands each image into its
    placeholder tokens and masks everything outside the template's `{% generation %}` blocks. The wrapper adds what
    TRL's collator does not do:

    - it pads on the tokenizer's `padding_side` (TRL always pads on the right), moving every per-token tensor the
      processor returns (`mm_token_type_ids`, `token_type_ids`, ...: any `(batch, seq, ...)` tensor that is not an
      image-processor output) with `input_ids`;
    - `max_length` truncates those tensors too and never cuts an image: a sample whose image tokens (the processor's
      `image_token_ids`, e.g. Gemma 3's `<image_soft_token>` rather than its `<start_of_image>`) or the special token
      that closes an image span (`<|vision_end|>`, `<end_of_image>`, ...) would be cut is a bad sample, so a start
      token is never kept without its span;
    - a prefix-LM processor (PaliGemma's, see [`is_prefix_lm`]) gets the prompt and the answer (as `suffix`) apart,
      so that it marks the answer itself: `token_type_ids` 1 and `labels` on the answer, the images and the prompt
      the model's bidirectional prefix. (Through TRL's collator the answer would be in the prefix, where every
      position sees it, and PaliGemma's inserted `<s>` shifts the assistant mask.) Each sample is then one prompt,
      with at least one image, and one answer: its conversation must end with its only assistant turn. The prompt is
      [`prompt_text`]'s, as in evaluation;
    - every bad sample is named by its dataset index (with [`~hf_sparse_mllm.data.samples.index_samples`]) and the
      image path or column: an image that cannot be read (undecodable bytes, a missing file: "file not found:
      <path>"), `{"type": "image"}` blocks that do not match its images, a sample the processor rejects, a sample
      longer than `max_length` in its image tokens, or one whose reading failed in the dataset.

    Args:
        processor ([`~transformers.ProcessorMixin`]):
            A vision-language processor whose chat template marks assistant turns with `{% generation %}` (the tiny
            ones from [`~hf_sparse_mllm.tiny.build_tiny_model_and_processor`] do), or a prefix-LM one (see above),
            and whose tokenizer has a pad token.
        max_length (`int`, *optional*):
            Drop tokens beyond this length (from the end). `None` keeps whole samples.
        skip_bad_samples (`bool`, *optional*, defaults to `False`):
            Drop bad samples from the batch with a warning naming them, instead of raising a
            [`~hf_sparse_mllm.data.samples.BadSampleError`]. The batch then carries the number dropped under
            [`SKIPPED_SAMPLES_KEY`] (also when it is 0), which the trainer pops and logs as `sparse/skipped_samples`.
            A batch whose samples are all bad still raises (there is nothing to collate).

    Returns (from `__call__`):
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels` (the answer tokens and the closing
        end-of-turn token; prompt, image placeholders and padding are -100), the image inputs when the batch has
        images (`pixel_values`, one row per image present in sample order for most families, plus `image_grid_thw`,
        `image_sizes`, `pixel_attention_mask`, ... where the family has them), the per-token inputs of the family
        (`mm_token_type_ids`, `token_type_ids`) and, with `skip_bad_samples=True`, [`SKIPPED_SAMPLES_KEY`].

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.data.collator import VisionLanguageCollator
    >>> from hf_sparse_mllm.tiny import build_tiny_processor
    >>> processor = build_tiny_processor(["what", "color", "red", "blue"])
    >>> collator = VisionLanguageCollator(processor)
    >>> question = {"type": "text", "text": "what color ?"}
    >>> batch = collator([
    ...     {"images": [Image.new("RGB", (32, 32), "red")],
    ...      "messages": [{"role": "user", "content": [{"type": "image"}, question]},
    ...                   {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
    ...     {"images": [], "messages": [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "blue"}]},
    ... ])
    >>> batch["input_ids"].shape, batch["pixel_values"].shape
    (torch.Size([2, 26]), torch.Size([1, 3, 32, 32]))
    >>> labels = batch["labels"][1]
    >>> processor.tokenizer.decode(labels[labels != -100])
    'blue </s>'
    >>> skipping = VisionLanguageCollator(processor, skip_bad_samples=True)
    >>> missing = {"images": ["no/such/image.png"], "messages": [{"role": "user", "content": "what color ?"}]}
    >>> batch = skipping([missing, {"images": [], "messages": [{"role": "user", "content": "what color ?"}]}])
    >>> batch["input_ids"].shape[0], batch["sparse_skipped_samples"]
    (1, tensor(1))
    ```
    """

    def __init__(self, processor: ProcessorMixin, max_length: int | None = None, skip_bad_samples: bool = False):
        template = processor.chat_template
        if isinstance(template, dict):  # several named templates: TRL renders the default one
            template = template.get("default")
        self._prefix_lm = is_prefix_lm(processor)
        if self._prefix_lm and isinstance(processor.chat_template, dict) and template is None:
            raise ValueError(
                f"The processor has chat templates {sorted(processor.chat_template)} but none named 'default', which "
                "VisionLanguageCollator renders: name one 'default'."
            )
        if not self._prefix_lm and (not isinstance(template, str) or "generation" not in template):
            raise ValueError(
                "VisionLanguageCollator needs a processor whose chat template marks the assistant turns with "
                "`{% generation %}` (to train only the answers); build one with hf_sparse_mllm.tiny.build_tiny_processor "
                "or set `processor.chat_template`."
            )
        if processor.tokenizer.pad_token_id is None:
            raise ValueError("The processor's tokenizer has no pad token; set `processor.tokenizer.pad_token`.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
        # TRL is imported here, not at module level: the package imports on machines without it.
        from trl.data_utils import prepare_multimodal_messages
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self.processor = processor
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self._trl_collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
        self._prepare_messages = prepare_multimodal_messages
        self._image_token_ids = torch.tensor(sorted(_image_token_ids(processor)), dtype=torch.long)
        tokenizer = processor.tokenizer
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._special_ids = torch.tensor(sorted(special), dtype=torch.long)
        image_processor = getattr(processor, "image_processor", None)
        self._image_input_names = frozenset(getattr(image_processor, "model_input_names", ()))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VisionLanguageCollator got no samples to collate.")
        good: dict[int, dict] = {}  # batch position -> TRL input
        bad: list[BadSample] = []
        for position, example in enumerate(examples):
            try:
                good[position] = self._prepare(example)
            except _BadSample as reason:
                bad.append(BadSample(_index_of(example), position, str(reason)))
        self._reject(bad, bad, good)
        while True:  # each round collates the samples still good; a round that finds no bad sample is the batch
            batch, newly_bad, hint = self._collate(good, examples)
            if not newly_bad:
                break
            bad.extend(newly_bad)
            self._reject(newly_bad, bad, good, hint)
        if self.processor.tokenizer.padding_side == "left":
            _right_to_left_padding(batch, self._per_token_keys(batch))
        if self.skip_bad_samples:
            batch[SKIPPED_SAMPLES_KEY] = torch.tensor(len(bad), dtype=torch.int64)
        return batch

    def _prepare(self, example: dict[str, Any]) -> dict[str, Any]:
        """Load a sample's images and match them to its messages; TRL's collator gets them as PIL images."""
        if SAMPLE_ERROR_KEY in example:
            raise _BadSample(f"reading the sample failed: {example[SAMPLE_ERROR_KEY]}")
        if "messages" not in example:
            raise _BadSample(
                f'it has no "messages" (keys: {sorted(example)}); VisionLanguageCollator expects TRL conversational '
                'samples with "messages" and "images"'
            )
        if "images" in example or example.get("image") is None:
            column, raw = "images", list(example.get("images") or [])
            images = [self._load(image, f"images[{k}]") for k, image in enumerate(raw)]
        else:
            column, images = "image", [self._load(example["image"], "image")]
        try:
            messages = self._prepare_messages(example["messages"], images=images)
        except (ValueError, KeyError, TypeError) as error:
            raise _BadSample(f'its {column!r} column does not match its {{"type": "image"}} blocks: {error}') from None
        # TRL's format also allows images inside the messages (`{"type": "image", "image": <path>}`).
        messages = [self._load_inline_images(message, m) for m, message in enumerate(messages)]
        if self._prefix_lm:
            roles = [message.get("role") for message in messages]
            if roles[-1:] != ["assistant"] or roles.count("assistant") != 1:
                raise _BadSample(
                    f"{type(self.processor).__name__} is a prefix-LM processor (it takes the answer as `suffix`), so "
                    f"a sample is one prompt and one answer: its messages must end with their only assistant turn, "
                    f"got roles {roles}"
                )
            if not _has_image({"messages": messages}):
                # transformers 5.24's PaliGemmaProcessor puts its `<s>` after the last image of every sample, and in
                # a sample without one 6 characters into the prompt.
                raise _BadSample(
                    f"it has no image, and {type(self.processor).__name__} needs one in every sample (it would put "
                    "the `<s>` it inserts after the last image inside the prompt's text)"
                )
        return {"images": [], "messages": messages}

    def _processor_batch(self, samples: list[dict]) -> dict:
        """The processor's batch of prepared samples, right-padded: TRL's collator's, or the prefix-LM one."""
        if not self._prefix_lm:
            return dict(self._trl_collator(samples))
        prompts, answers, images = [], [], []
        for sample in samples:
            *turns, answer = sample["messages"]
            images.append([part["image"] for turn in turns for part in turn["content"] if part.get("type") == "image"])
            prompts.append(prompt_text(self.processor, turns))
            answers.append(" ".join(part["text"] for part in answer["content"] if part.get("type") == "text"))
        batch = self.processor(
            text=prompts, images=images, suffix=answers, padding=True, padding_side="right", return_tensors="pt"
        )
        return dict(batch)

    def _load_inline_images(self, message: dict, m: int) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        parts = []
        for c, part in enumerate(content):
            image = part.get("image") if isinstance(part, dict) and part.get("type") == "image" else None
            if image is not None and not isinstance(image, PIL.Image.Image):
                part = {**part, "image": self._load(image, f"messages[{m}].content[{c}].image")}
            parts.append(part)
        return {**message, "content": parts}

    @staticmethod
    def _load(image: Any, where: str) -> PIL.Image.Image:
        try:
            return load_image(image)
        except FileNotFoundError as error:
            raise _BadSample(f"{where}: {error}") from None
        except PIL.UnidentifiedImageError:
            raise _BadSample(
                f"{where} ({describe_image(image)}): undecodable image (PIL cannot identify it)"
            ) from None
        except Exception as error:  # whatever PIL, datasets or transformers raise for an unreadable image
            raise _BadSample(f"{where} ({describe_image(image)}): {type(error).__name__}: {error}") from None

    def _collate(self, good: dict[int, dict], examples: list[dict]) -> tuple[dict, list[BadSample], str]:
        """Collate `good` (right-padded, truncated); or name the samples that fail alone or would lose image tokens
        (with a hint for the error)."""
        try:
            batch = self._processor_batch(list(good.values()))
        except Exception:
            first_has_image = _has_image(next(iter(good.values())))
            if not first_has_image and any(_has_image(sample) for sample in good.values()):
                # InternVL's and Idefics3's processors (transformers 5.24) cannot tensorise their text-replacement
                # offsets when the first sample has no image: put one with an image first (rows follow).
                return self._collate(dict(sorted(good.items(), key=lambda item: not _has_image(item[1]))), examples)
            # One processor call for the whole batch says nothing about the sample at fault: find it alone.
            failing = []
            for position, sample in good.items():
                try:
                    self._processor_batch([sample])
                except Exception as error:
                    reason = f"the processor rejected it: {type(error).__name__}: {error}"
                    failing.append(BadSample(_index_of(examples[position]), position, reason))
            if not failing:
                raise
            return {}, failing, ""
        if self.max_length is None or batch["input_ids"].shape[1] <= self.max_length:
            return batch, [], ""
        needed = self._needed_lengths(batch)
        too_long = [
            BadSample(
                _index_of(examples[position]),
                position,
                f"it needs max_length >= {int(length)} to keep its image tokens, got max_length={self.max_length}",
            )
            for position, length in zip(good, needed.tolist())
            if length > self.max_length
        ]
        if too_long:
            return {}, too_long, f"Use max_length >= {int(needed.max())} or shorter prompts."
        for key in self._per_token_keys(batch):
            batch[key] = batch[key][:, : self.max_length]
        return batch, [], ""

    def _needed_lengths(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row, the shortest length keeping every image token and the special token closing the last image."""
        input_ids, real = batch["input_ids"], batch["attention_mask"].bool()
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        is_image = torch.isin(input_ids, self._image_token_ids) & real
        last = torch.where(is_image, positions, -1).max(dim=1).values  # -1: no image in the row
        after = (last + 1).clamp(max=input_ids.shape[1] - 1).unsqueeze(1)
        closes = (
            torch.isin(input_ids.gather(1, after), self._special_ids) & real.gather(1, after) & (after > last[:, None])
        )
        return torch.where(last >= 0, last + 1 + closes.squeeze(1).long(), 0)

    def _per_token_keys(self, batch: dict[str, Any]) -> list[str]:
        """Tensors that are `(batch, seq, ...)` like `input_ids`, except image-processor outputs (e.g. Idefics3's
        `(batch, tiles, ...)` pixel values, which could happen to have as many tiles as tokens)."""
        shape = batch["input_ids"].shape
        return [
            key
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and value.shape[:2] == shape
            and key not in self._image_input_names
        ]

    def _reject(self, newly_bad: list[BadSample], bad: list[BadSample], good: dict[int, dict], hint: str = "") -> None:
        """Raise for `newly_bad`, or (skipping) drop them from `good` with a warning; raise for all `bad` samples if
        none is left."""
        if not newly_bad:
            return
        if not self.skip_bad_samples:
            skip_hint = "Pass skip_bad_samples=True to VisionLanguageCollator to drop bad samples with a warning."
            raise BadSampleError.from_samples(newly_bad, f"{hint} {skip_hint}" if hint else skip_hint)
        for sample in newly_bad:
            good.pop(sample.position, None)  # samples rejected before collation are not in `good`
        if not good:
            raise BadSampleError.from_samples(
                bad,
                f"All {len(bad)} samples of the batch are bad, and skip_bad_samples cannot return an empty batch: fix "
                "or remove them (e.g. `dataset.select`), or use a larger batch.",
            )
        lines = "\n".join(f"  - {sample}" for sample in newly_bad)
        logger.warning("Skipping %d bad sample(s) of the batch:\n%s", len(newly_bad), lines)


class _BadSample(Exception):
    """Why one sample cannot be collated (turned into a `BadSample` with its index)."""


def is_prefix_lm(processor: ProcessorMixin) -> bool:
    """
    Whether `processor` is a prefix-LM one: it takes the answer apart from the prompt (as `suffix`) and marks it with
    `token_type_ids` 1, the rest being the model's bidirectional prefix. In `transformers` 5.24:
    [`~transformers.PaliGemmaProcessor`] (PaliGemma 1 and 2). ColPali's processors take a `suffix` too, with another
    meaning, so the check is by class.
    """
    return isinstance(processor, PaliGemmaProcessor)


def prompt_text(processor: ProcessorMixin, turns: Sequence[dict]) -> str:
    """
    The prompt of `turns` (the messages before the answer, TRL's format) as text for `processor`: its chat template
    with the generation prompt; for a prefix-LM processor without one (PaliGemma's checkpoints have none), one image
    token per image, then the turns' text joined by spaces (the processor puts its `<s>` after the images).

    Example:

    ```python
    >>> from hf_sparse_mllm.data.collator import prompt_text
    >>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor
    >>> _, processor = build_tiny_model_and_processor("paligemma", words=["what", "color"])
    >>> turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    >>> prompt_text(processor, turns)
    ' user : <image> what color ? assistant :'
    >>> processor.chat_template = None
    >>> prompt_text(processor, turns)
    '<image>what color ?'
    ```
    """
    if processor.chat_template:
        return processor.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=False)
    if not is_prefix_lm(processor):
        raise ValueError(f"{type(processor).__name__} has no chat template to render the prompt with.")
    parts = [
        part
        for turn in turns
        for part in (
            turn["content"] if isinstance(turn["content"], list) else [{"type": "text", "text": turn["content"]}]
        )
    ]
    images = sum(part.get("type") == "image" for part in parts)
    return processor.image_token * images + " ".join(part["text"] for part in parts if part.get("type") == "text")


def _has_image(sample: dict[str, Any]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") == "image"
        for message in sample["messages"]
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def _index_of(example: dict[str, Any]) -> int | None:
    index = example.get(SAMPLE_INDEX_KEY) if isinstance(example, dict) else None
    return int(index) if index is not None else None


def _image_token_ids(processor: ProcessorMixin) -> set[int]:
    """The ids of the image placeholder tokens: `processor.image_token_ids` (those its `mm_token_type_ids` mark; for
    Gemma 3 the soft token, not `processor.image_token_id`, which is `<start_of_image>`), else `image_token_id`, else
    the tokenizer's `image_token`."""
    ids = list(getattr(processor, "image_token_ids", None) or [getattr(processor, "image_token_id", None)])
    tokenizer = processor.tokenizer
    if all(i is None for i in ids) and getattr(tokenizer, "image_token", None):
        ids = [tokenizer.convert_tokens_to_ids(tokenizer.image_token)]
    found = {int(i) for i in ids if i is not None}
    if not found:
        raise ValueError(
            f"Cannot find the image placeholder token of {type(processor).__name__}: it has no `image_token_ids` or "
            "`image_token_id`, and its tokenizer no `image_token`."
        )
    return found


def _right_to_left_padding(batch: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Rotate each right-padded row of every per-token tensor so its padding comes first (the tokens a left-padding
    tokenizer gives), in place."""
    mask = batch["attention_mask"]
    length = mask.shape[1]
    num_pad = length - mask.sum(dim=1, keepdim=True)
    index = (torch.arange(length, device=mask.device) - num_pad) % length
    for key in keys:
        value = batch[key]
        row_index = index.view(*index.shape, *([1] * (value.dim() - 2))).expand_as(value)
        batch[key] = value.gather(1, row_index)


__all__ = ["SKIPPED_SAMPLES_KEY", "VisionLanguageCollator", "is_prefix_lm", "prompt_text"]

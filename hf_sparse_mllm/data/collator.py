"""Data collator for conversational vision-language samples in TRL's format."""

from __future__ import annotations

from typing import Any

import torch
from transformers import ProcessorMixin
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling


class VisionLanguageCollator:
    """
    Collate TRL conversational samples (`{"images": [...], "messages": [...]}`) into a training batch in which only
    the assistant answers are trained.

    A thin wrapper around TRL's [`~trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling`] with
    `assistant_only_loss=True`: TRL renders the chat template, inserts the images, expands each `<image>` into its
    placeholder tokens and masks everything outside the template's `{% generation %}` blocks. The wrapper adds two
    things TRL's collator does not do:

    - it pads on the tokenizer's `padding_side` (TRL always pads on the right, which breaks left-padded batches for
      generation-style evaluation);
    - `max_length` never cuts through an image's placeholders (TRL passes truncation to the tokenizer, which can
      leave fewer placeholders than image features); a sample that would lose image tokens raises instead.

    Args:
        processor ([`~transformers.ProcessorMixin`]):
            A vision-language processor whose chat template marks assistant turns with `{% generation %}` (the one
            from [`~hf_sparse_mllm.tiny.build_tiny_processor`] does) and whose tokenizer has a pad token.
        max_length (`int`, *optional*):
            Drop tokens beyond this length (from the end). `None` keeps whole samples.

    Returns (from `__call__`):
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels` (the answer tokens and the closing
        end-of-turn token; prompt, image placeholders and padding are -100) and `pixel_values` (only when the batch
        has images: one row per image present, in sample order).

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
    ```
    """

    def __init__(self, processor: ProcessorMixin, max_length: int | None = None):
        template = processor.chat_template
        if isinstance(template, dict):  # several named templates: TRL renders the default one
            template = template.get("default")
        if not isinstance(template, str) or "generation" not in template:
            raise ValueError(
                "VisionLanguageCollator needs a processor whose chat template marks the assistant turns with "
                "`{% generation %}` (to train only the answers); build one with hf_sparse_mllm.tiny.build_tiny_processor "
                "or set `processor.chat_template`."
            )
        if processor.tokenizer.pad_token_id is None:
            raise ValueError("The processor's tokenizer has no pad token; set `processor.tokenizer.pad_token`.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self._trl_collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples or "messages" not in examples[0]:
            raise ValueError(
                'VisionLanguageCollator expects samples with a "messages" key (TRL conversational format).'
            )
        # TRL's collator reads "images" (and the optional "image"); leave everything else (ids, answers) out.
        inputs = [{"images": _images_of(e), "messages": e["messages"]} for e in examples]
        batch = dict(self._trl_collator(inputs))  # right-padded
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            self._check_images_survive(batch["input_ids"])
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key] = batch[key][:, : self.max_length]
        if self.processor.tokenizer.padding_side == "left":
            batch = _right_to_left_padding(batch)
        return batch

    def _check_images_survive(self, input_ids: torch.Tensor) -> None:
        image_token_id = getattr(self.processor, "image_token_id", None)
        if image_token_id is None:
            return
        cut = (input_ids[:, self.max_length :] == image_token_id).any(dim=1)
        if cut.any():
            needed = int((input_ids == image_token_id).nonzero()[:, 1].max()) + 1
            raise ValueError(
                f"max_length={self.max_length} would cut image placeholder tokens of sample(s) "
                f"{cut.nonzero().flatten().tolist()}; use max_length >= {needed} or shorter prompts."
            )


def _images_of(example: dict[str, Any]) -> list:
    if "images" in example:
        return list(example["images"] or [])
    return [] if example.get("image") is None else [example["image"]]


def _right_to_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rotate each right-padded row so its padding comes first; the same tokens a left-padding tokenizer gives."""
    mask = batch["attention_mask"]
    length = mask.shape[1]
    num_pad = length - mask.sum(dim=1, keepdim=True)
    index = (torch.arange(length, device=mask.device) - num_pad) % length
    for key in ("input_ids", "attention_mask", "labels"):
        batch[key] = batch[key].gather(1, index)
    return batch


__all__ = ["VisionLanguageCollator"]

"""A batched collator for the generated VQA data: the stock collator's batches without its per-sample cost."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaProcessor

from hf_sparse_mllm.data.collator import VisionLanguageCollator


class VQABatchCollator:
    """
    [`~hf_sparse_mllm.data.collator.VisionLanguageCollator`]'s batches for the generated VQA data, at half its cost.

    On 2 CPU cores the stock collation (TRL's chat-template rendering with assistant masks, the PIL image processor)
    takes a third of a tiny model's training step, and it runs in the same process as the step. For batches of
    one-image, one-turn samples whose image already has the processor's size (the generated data), this collator
    renders the same chat template, expands `<image>` to its placeholders, tokenises the batch in one call, masks
    everything but the answer and its `</s>`, and normalises the stacked pixels with the processor's mean and std;
    `tests/test_demo.py` checks that the batches equal the stock collator's. Other batches, and every batch of a
    processor other than LLaVA's (Qwen2-VL's resizes and patchifies images itself), go to the stock collator. Both runs
    of a comparison use it, so the comparison is unchanged; it only keeps data preparation from hiding the training
    speed-up.

    Args:
        processor (`ProcessorMixin`):
            The model's processor; a `LlavaProcessor` with a right-padding tokenizer takes the batched path.

    Example:

    ```python
    >>> from benchmarks.harness.collator import VQABatchCollator
    >>> from benchmarks.harness.presets import DEMO_PRESETS, build_model
    >>> from hf_sparse_mllm.data.vqa import build_vqa_dataset
    >>> _, processor = build_model(DEMO_PRESETS["quick"])
    >>> rows = list(build_vqa_dataset(num_train=2, num_test=0, image_size=64, cell_size=16)["train"])
    >>> batch = VQABatchCollator(processor)(rows)
    >>> batch["pixel_values"].shape
    torch.Size([2, 3, 64, 64])

    ```
    """

    def __init__(self, processor):
        self.processor = processor
        self.stock = VisionLanguageCollator(processor)
        self.tokenizer = processor.tokenizer
        self.batched = isinstance(processor, LlavaProcessor)
        if not self.batched:
            return
        image_processor = processor.image_processor
        self.size = (image_processor.crop_size["height"], image_processor.crop_size["width"])
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        patches = (self.size[0] // processor.patch_size) * (self.size[1] // processor.patch_size)
        self.image_text = processor.image_token * (patches + processor.num_additional_image_tokens)
        if processor.vision_feature_select_strategy == "default":
            self.image_text = processor.image_token * patches
        self.answer_marker = self.tokenizer.convert_tokens_to_ids(["assistant", ":"])

    def _can_batch(self, examples) -> bool:
        if not self.batched or self.tokenizer.padding_side != "right":
            return False
        for example in examples:
            images = example.get("images") or []
            if len(images) != 1 or getattr(images[0], "size", None) != self.size[::-1]:
                return False
            if [m["role"] for m in example["messages"]] != ["user", "assistant"]:
                return False
        return True

    def __call__(self, examples):
        if not self._can_batch(examples):
            return self.stock(examples)
        texts = [
            self.processor.apply_chat_template(e["messages"], tokenize=False).replace(
                self.processor.image_token, self.image_text
            )
            for e in examples
        ]
        encoded = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        labels = torch.full_like(input_ids, -100)
        for row, ids in enumerate(input_ids.tolist()):
            length = int(attention_mask[row].sum())
            # The answer is everything after the last "assistant :" (the template's generation block).
            start = max(i for i in range(length - 1) if ids[i : i + 2] == self.answer_marker) + 2
            labels[row, start:length] = input_ids[row, start:length]
        pixels = np.stack([np.asarray(e["images"][0].convert("RGB")) for e in examples])
        pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
        pixel_values = (pixel_values - self.mean) / self.std
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
        }

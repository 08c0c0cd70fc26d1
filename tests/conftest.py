"""Shared helpers: a tiny offline LLaVA, a few conversational samples and a trainer factory."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

WORDS = ["what", "color", "shape", "is", "the", "object", "red", "green", "blue", "circle", "square", "yes", "no", "a"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_sample(i: int, with_image: bool = True) -> dict:
    """A deterministic sample; question lengths vary so batches need padding."""
    colour = list(COLORS)[i % 3]
    question = "what color is the object ?" if i % 2 == 0 else "what is the color of the object ?"
    user = [{"type": "image"}] if with_image else []
    user.append({"type": "text", "text": question})
    return {
        "images": [Image.new("RGB", (32, 32), COLORS[colour])] if with_image else [],
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": colour}]},
        ],
    }


def make_dataset(n: int, with_image: bool = True) -> list[dict]:
    return [make_sample(i, with_image) for i in range(n)]


def tiny_llava(padding_side: str = "right", seed: int = 0, **overrides):
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    model, processor = build_tiny_llava_and_processor("test", words=WORDS, seed=seed, **overrides)
    processor.tokenizer.padding_side = padding_side
    return model, processor


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps, as a killed job would (the schedule keeps its full length)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def collate(processor, samples):
    from hf_sparse_mllm.data.collator import VisionLanguageCollator

    return VisionLanguageCollator(processor)(samples)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

"""VisionLanguageCollator: padding side, max_length and per-token tensors for every family; bad samples by index."""

from __future__ import annotations

import doctest
import importlib.util
import io
import logging
import re
import sys

import pytest
import torch
from conftest import WORDS, make_dataset, make_sample, tiny_llava, training_args
from PIL import Image

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.data import collator as collator_module
from hf_sparse_mllm.data import samples as samples_module
from hf_sparse_mllm.data.collator import SKIPPED_SAMPLES_KEY, VisionLanguageCollator
from hf_sparse_mllm.data.samples import (
    SAMPLE_INDEX_KEY,
    BadSampleError,
    IndexedDataset,
    index_samples,
    load_image,
)
from hf_sparse_mllm.evaluation.generation import generate_answers, render_prompt
from hf_sparse_mllm.tiny import build_tiny_llava_and_processor, build_tiny_model_and_processor, list_tiny_families

QUESTION = "what color is the object ?"
RED, BLUE = (200, 30, 30), (30, 30, 200)


def _sample(answer: str = "red", image: bool = True, question: str = QUESTION, size=(40, 30)) -> dict:
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {
        "images": [Image.new("RGB", size, RED)] if image else [],
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def _answer_tokens(tokenizer, labels: torch.Tensor) -> list[str]:
    return tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())


def _png(size=(32, 32), colour=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA: labels, padding side, text-only and mixed batches, max_length.


@pytest.fixture(scope="module")
def built():
    return build_tiny_llava_and_processor("test", words=WORDS)


@pytest.fixture
def processor(built):
    _, processor = built
    processor.tokenizer.padding_side = "right"
    yield processor
    processor.tokenizer.padding_side = "right"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_forward_and_answer_only_labels(built, processor, padding_side):
    model, _ = built
    processor.tokenizer.padding_side = padding_side
    answers = ["red", "a blue circle", "no"]
    samples = [_sample(answers[0]), _sample(answers[1], question="what is the object ?"), _sample(answers[2])]
    batch = VisionLanguageCollator(processor)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() > 1  # the batch really is padded
    pad_columns = batch["attention_mask"][:, 0 if padding_side == "left" else -1] == 0
    assert pad_columns.any()
    for row, answer in enumerate(answers):
        assert _answer_tokens(processor.tokenizer, batch["labels"][row]) == [*answer.split(), "</s>"]
        # Padding is where the tokenizer puts it, and the real tokens are contiguous.
        real = batch["attention_mask"][row].nonzero().flatten()
        assert (real.diff() == 1).all()
        assert batch["input_ids"][row][batch["attention_mask"][row] == 0].eq(processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all()

    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))


def test_left_and_right_padding_hold_the_same_tokens(processor):
    samples = make_dataset(3)
    right = VisionLanguageCollator(processor)(samples)
    processor.tokenizer.padding_side = "left"
    left = VisionLanguageCollator(processor)(samples)
    torch.testing.assert_close(left["pixel_values"], right["pixel_values"])
    for key in ("input_ids", "labels"):
        for row in range(3):
            assert left[key][row][left["attention_mask"][row].bool()].tolist() == (
                right[key][row][right["attention_mask"][row].bool()].tolist()
            )


def test_text_only_and_mixed_batches(built, processor):
    model, _ = built
    text_only = VisionLanguageCollator(processor)(make_dataset(2, with_image=False))
    assert "pixel_values" not in text_only
    assert (text_only["input_ids"] != processor.image_token_id).all()
    mixed_samples = [_sample(image=False), _sample("green"), _sample("blue", image=False)]
    mixed = VisionLanguageCollator(processor)(mixed_samples)
    assert mixed["pixel_values"].shape[0] == 1
    assert (mixed["input_ids"] == processor.image_token_id).sum(1).tolist() == [0, 16, 0]
    assert _answer_tokens(processor.tokenizer, mixed["labels"][2]) == ["blue", "</s>"]
    with torch.no_grad():
        for batch in (text_only, mixed):
            assert torch.isfinite(model(**batch).loss)


def test_collator_max_length(processor):
    samples = [_sample("a red circle")]
    full = VisionLanguageCollator(processor)(samples)
    cut = VisionLanguageCollator(processor, max_length=full["input_ids"].shape[1] - 2)(samples)
    assert _answer_tokens(processor.tokenizer, cut["labels"][0]) == ["a", "red"]
    # "<s> user :" then 16 placeholders: the image ends at token 19.
    with pytest.raises(ValueError, match=r"batch position 1: it needs max_length >= 19(.|\n)*max_length >= 19"):
        VisionLanguageCollator(processor, max_length=10)([_sample(image=False), *samples])


def test_collator_rejects_template_without_generation_markers():
    _, processor = build_tiny_llava_and_processor("test", words=WORDS)
    processor.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        VisionLanguageCollator(processor)


class _FencedParser(doctest.DocTestParser):
    """Ignore the ```python fences around HF-style examples."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"(?m)^[ \t]*```.*$", "", string), name)


@pytest.mark.parametrize("module", [collator_module, samples_module], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(parser=_FencedParser()).find(module):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("module", [collator_module, samples_module], ids=lambda m: m.__name__)
def test_modules_import_without_trl_and_datasets(module, monkeypatch):
    """The GPU benchmark machine has neither: the modules import them only where they are used."""
    monkeypatch.setitem(sys.modules, "trl", None)  # any import of them now fails
    monkeypatch.setitem(sys.modules, "datasets", None)
    spec = importlib.util.spec_from_file_location(f"{module.__name__}_copy", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    copy.__package__ = module.__package__
    monkeypatch.setitem(sys.modules, spec.name, copy)  # dataclasses look their module up there
    spec.loader.exec_module(copy)
    assert copy.__all__ == module.__all__
    if module is samples_module:
        assert copy.index_samples([{"messages": []}])[0] == {"messages": [], SAMPLE_INDEX_KEY: 0}


# ---------------------------------------------------------------------------------------------------------------------
# Every family: per-token tensors follow input_ids through left padding and max_length; the model accepts the batch.

FAMILIES = [
    "llava",
    "vipllava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "qwen3_5_moe",
    "glm4v",
    "glm4v_moe",
    "glm46v",
    "idefics3",
    "smolvlm",
    "gemma3",
    "gemma4",
    "internvl",
    "mistral3",
    "aya_vision",
    "lfm2_vl",
    "paligemma",
]
# SmolVLM's processor imports `num2words` (for video prompts) even when it only processes images.
NEEDS_NUM2WORDS = pytest.mark.skipif(
    importlib.util.find_spec("num2words") is None, reason="SmolVLM's processor needs the num2words package"
)
FAMILY_PARAMS = [pytest.param(f, marks=[NEEDS_NUM2WORDS] if f == "smolvlm" else [], id=f) for f in FAMILIES]
TYPE_IDS = {"qwen2_5_vl": "mm_token_type_ids", "gemma3": "token_type_ids", "gemma4": "mm_token_type_ids"}

_BUILT: dict[str, tuple] = {}


def _family(name: str):
    """One model and processor per family for the whole module."""
    if name not in _BUILT:
        _BUILT[name] = build_tiny_model_and_processor(name, words=WORDS)
    model, processor = _BUILT[name]
    processor.tokenizer.padding_side = "right"
    return model, processor


def _family_samples(family: str) -> list[dict]:
    """One image, two images and text only (one image for a prefix-LM processor, PaliGemma's, which needs one in
    every sample), with answers of different lengths, indexed 10, 11, 12."""
    sizes = ((64, 48), (48, 96)) if family.startswith("qwen") else ((40, 30), (30, 60))
    first, second = (Image.new("RGB", size, colour) for size, colour in zip(sizes, (RED, BLUE)))
    two = [
        {"type": "image"},
        {"type": "text", "text": "is the object"},
        {"type": "image"},
        {"type": "text", "text": "red ?"},
    ]
    samples = [
        _sample("red", size=sizes[0]) | {"images": [first]},
        {
            "images": [first, second],
            "messages": [{"role": "user", "content": two}, {"role": "assistant", "content": "a red object"}],
        },
        {
            "images": [],
            "messages": [{"role": "user", "content": "is the object blue ?"}, {"role": "assistant", "content": "no"}],
        },
    ]
    if family == "paligemma":
        samples[2] = _sample("no", question="is the object blue ?", size=sizes[1])
    return [sample | {SAMPLE_INDEX_KEY: 10 + i} for i, sample in enumerate(samples)]


def _collate(processor, samples, padding_side="right", **kwargs):
    processor.tokenizer.padding_side = padding_side
    try:
        return VisionLanguageCollator(processor, **kwargs)(samples)
    finally:
        processor.tokenizer.padding_side = "right"


def _real_rows(batch, key, row):
    return batch[key][row][batch["attention_mask"][row].bool()]


def _assert_same_real_logits(model, batch, reference):
    """Each row of `batch` holds a prefix of the same row of `reference`: its logits there are the reference's."""
    with torch.no_grad():
        logits, reference_logits = model(**batch).logits, model(**reference).logits
    for row in range(batch["input_ids"].shape[0]):
        ids, reference_ids = _real_rows(batch, "input_ids", row), _real_rows(reference, "input_ids", row)
        assert torch.equal(ids, reference_ids[: len(ids)])
        torch.testing.assert_close(
            logits[row][batch["attention_mask"][row].bool()],
            reference_logits[row][reference["attention_mask"][row].bool()][: len(ids)],
            rtol=1e-4,
            atol=1e-5,
        )


def _per_token(batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k.endswith("token_type_ids")}


def test_every_family_is_tested():
    assert set(list_tiny_families()) - {"docs_llava"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_family_left_padded_truncated_batch_runs_the_model(family):
    model, processor = _family(family)
    samples = _family_samples(family)
    right = _collate(processor, samples)
    length = right["input_ids"].shape[1]
    batch = _collate(processor, samples, padding_side="left", max_length=length - 1)
    assert (batch["attention_mask"][:, 0] == 0).any() and batch["input_ids"].shape[1] == length - 1
    for key in _per_token(right):
        assert batch[key].shape == (3, length - 1), key
    _assert_same_real_logits(model, batch, right)
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL (`mm_token_type_ids`, M-RoPE) and Gemma 3 (`token_type_ids`, soft tokens between start and end tokens).


def _needed_lengths(model, batch) -> list[int]:
    """Per row of a right-padded batch: one past the token closing its last image (0 without images)."""
    placeholder = batch["input_ids"] == model.config.image_token_id
    return [int(row.nonzero().max()) + 2 if row.any() else 0 for row in placeholder]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "gemma4"])
def test_type_ids_stay_on_the_placeholders(family, padding_side):
    model, processor = _family(family)
    samples = _family_samples(family)
    right = _collate(processor, samples)
    needed = _needed_lengths(model, right)
    max_length = max(needed) + 1  # cuts the longer rows' text, keeps every image
    assert max_length < right["input_ids"].shape[1]
    for batch in (
        _collate(processor, samples, padding_side),
        _collate(processor, samples, padding_side, max_length=max_length),
    ):
        type_ids = batch[TYPE_IDS[family]]
        assert type_ids.shape == batch["input_ids"].shape
        assert torch.equal(type_ids == 1, batch["input_ids"] == model.config.image_token_id)
        assert (batch["attention_mask"][:, 0 if padding_side == "left" else -1] == 0).any()
        _assert_same_real_logits(model, batch, right)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "gemma4"])
def test_truncation_never_cuts_an_image(family):
    model, processor = _family(family)
    samples = _family_samples(family)
    right = _collate(processor, samples)
    needed = _needed_lengths(model, right)
    # Inside the two-image sample's second image: samples 10 and 11 are named if the first image is cut too.
    with pytest.raises(BadSampleError, match=rf"dataset index 11: it needs max_length >= {needed[1]}") as error:
        _collate(processor, samples, max_length=needed[1] - 5)
    assert error.value.indices == [11] and f"Use max_length >= {needed[1]}" in str(error.value)
    with pytest.raises(BadSampleError) as error:
        _collate(processor, samples, max_length=needed[0] - 3)
    assert error.value.indices == [10, 11] and f"Use max_length >= {needed[1]}" in str(error.value)
    # Every placeholder kept, but not the end token closing the span (<|vision_end|>, <end_of_image>).
    with pytest.raises(BadSampleError, match="dataset index 11"):
        _collate(processor, samples, max_length=needed[1] - 1)
    kept = _collate(processor, samples, "left", max_length=needed[1])
    assert kept["input_ids"].shape[1] == needed[1]
    assert kept["input_ids"][1, -1] == right["input_ids"][1, needed[1] - 1]  # the closing token, left-padded row
    # With the opt-in, the sample that does not fit is dropped and counted.
    skipped = _collate(processor, samples, max_length=needed[1] - 1, skip_bad_samples=True)
    assert skipped["input_ids"].shape[0] == 2 and skipped[SKIPPED_SAMPLES_KEY] == 1
    assert torch.isfinite(model(**{k: v for k, v in skipped.items() if k != SKIPPED_SAMPLES_KEY}).loss)


# ---------------------------------------------------------------------------------------------------------------------
# PaliGemma (a prefix-LM processor: the answer goes in as `suffix`).


def test_prefix_lm_answer_is_the_causal_suffix():
    """`token_type_ids` are 1 exactly on the trained answer, so the answer is causal: its logits do not see the tokens
    after them (through TRL's collator they were all 0, the answer part of the bidirectional prefix)."""
    model, processor = _family("paligemma")
    batch = _collate(processor, [_sample("red blue"), _sample("red green"), _sample("no", size=(30, 60))])
    tokenizer = processor.tokenizer
    for row, answer in enumerate(["red blue", "red green", "no"]):
        assert _answer_tokens(tokenizer, batch["labels"][row]) == [*answer.split(), "</s>"]
        assert torch.equal(batch["token_type_ids"][row] == 1, batch["labels"][row] != -100)
    assert not batch["token_type_ids"][batch["input_ids"] == model.config.image_token_id].any()
    with torch.no_grad():
        logits = model(**batch).logits
    first = (batch["labels"][0] != -100).nonzero()[0].item()  # "red": the same prompt and first answer token
    torch.testing.assert_close(logits[0, : first + 1], logits[1, : first + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0, first + 1], logits[1, first + 1])  # "blue" and "green" differ


def test_prefix_lm_samples_are_one_prompt_and_one_answer():
    _, processor = _family("paligemma")
    two_turns = _sample()
    two_turns["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "sure ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    no_answer = _sample()
    no_answer["messages"] = no_answer["messages"][:1]
    samples = _indexed([_sample(), two_turns, no_answer, _sample(image=False)], start=20)
    with pytest.raises(BadSampleError) as error:
        _collate(processor, samples)
    assert error.value.indices == [21, 22, 23]
    message = str(error.value)
    assert "prefix-LM processor" in message and "roles ['user', 'assistant', 'user', 'assistant']" in message
    # PaliGemma's processor would put its `<s>` inside a text-only sample's prompt: named, and skipped on request.
    assert "dataset index 23: it has no image, and PaliGemmaProcessor needs one in every sample" in message
    batch = _collate(processor, samples, skip_bad_samples=True)
    assert batch["input_ids"].shape[0] == 1 and batch[SKIPPED_SAMPLES_KEY] == 3
    template = processor.chat_template
    processor.chat_template = {"chat": template}
    try:
        with pytest.raises(ValueError, match=r"chat templates \['chat'\] but none named 'default'"):
            VisionLanguageCollator(processor)
    finally:
        processor.chat_template = template


def test_prefix_lm_processor_without_a_chat_template():
    """PaliGemma checkpoints have no chat template: the prompt is the question, the processor puts the image first."""
    model, processor = _family("paligemma")
    template, processor.chat_template = processor.chat_template, None
    try:
        batch = _collate(processor, [_sample("red")])
        prompt = render_prompt(processor, _sample("red")["messages"])  # evaluation's prompt is the same
        answers = generate_answers(model, processor, [_sample("red")], max_new_tokens=2, progress=False)
    finally:
        processor.chat_template = template
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["<image>"] * 16 + ["<s>", *QUESTION.split(), "red", "</s>"]
    assert _answer_tokens(processor.tokenizer, batch["labels"][0]) == ["red", "</s>"]
    assert prompt == "<image>" + QUESTION and len(answers) == 1


def test_image_processor_outputs_are_not_per_token(processor):
    # Idefics3's pixel_values are (batch, tiles, ...): never rotated, even when there are as many tiles as tokens.
    batch = {"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4), "pixel_values": torch.ones(2, 4, 3)}
    batch["token_type_ids"] = torch.ones(2, 4, 2)
    assert VisionLanguageCollator(processor)._per_token_keys(batch) == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Bad samples: every error names the dataset index and the image; with the opt-in they are dropped and counted.


def _indexed(samples: list[dict], start: int = 0) -> list[dict]:
    return [sample | {SAMPLE_INDEX_KEY: start + i} for i, sample in enumerate(samples)]


def _with_images(images: list, blocks: int) -> dict:
    sample = _sample()
    sample["images"] = images
    sample["messages"][0]["content"] = [{"type": "image"}] * blocks + [{"type": "text", "text": QUESTION}]
    return sample


BAD_SAMPLES = {
    "undecodable": (_with_images([b"these bytes are no image"], 1), r"images\[0\] \(image bytes\): undecodable image"),
    "missing_file": (_with_images(["/no/such/dir/cat.png"], 1), r"images\[0\]: file not found: /no/such/dir/cat\.png"),
    "more_blocks": (
        _with_images([Image.new("RGB", (8, 8))], 2),
        r"its 'images' column does not match its \{\"type\": \"image\"\} blocks: .*\(1\).*\(2\)",
    ),
    "more_images": (
        _with_images([Image.new("RGB", (8, 8))] * 2, 1),
        r"its 'images' column does not match its \{\"type\": \"image\"\} blocks: .*\(2\).*\(1\)",
    ),
    "inline_missing": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "gone.jpg"}, {"type": "text", "text": "what"}]}
            ]
        },
        r"messages\[0\]\.content\[0\]\.image: file not found: gone\.jpg",
    ),
    "no_messages": ({"images": [], "text": "what"}, r'it has no "messages"'),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_bad_sample_error_names_the_index_and_the_image(processor, case):
    bad, reason = BAD_SAMPLES[case]
    samples = _indexed([_sample(), bad, _sample("blue")], start=40)
    with pytest.raises(BadSampleError, match=rf"1 bad sample in the batch:\n  - dataset index 41: {reason}") as error:
        VisionLanguageCollator(processor)(samples)
    assert error.value.indices == [41] and "skip_bad_samples=True" in str(error.value)
    # Without an index, the batch position is named, with what to do to get the index.
    with pytest.raises(BadSampleError, match=r"batch position 1: (.|\n)*wrap the dataset with (.|\n)*index_samples"):
        VisionLanguageCollator(processor)([_sample(), bad])


def test_skip_bad_samples_drops_and_counts(processor, caplog):
    samples = _indexed([_sample(), BAD_SAMPLES["missing_file"][0], _sample("blue"), BAD_SAMPLES["undecodable"][0]])
    with caplog.at_level(logging.WARNING, logger=collator_module.__name__):
        batch = VisionLanguageCollator(processor, skip_bad_samples=True)(samples)
    assert batch[SKIPPED_SAMPLES_KEY].dtype == torch.int64 and batch[SKIPPED_SAMPLES_KEY].dim() == 0
    assert int(batch[SKIPPED_SAMPLES_KEY]) == 2
    expected = VisionLanguageCollator(processor)([samples[0], samples[2]])
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert "Skipping 2 bad sample(s)" in caplog.text and "dataset index 1: images[0]: file not found" in caplog.text
    assert "dataset index 3" in caplog.text
    clean = VisionLanguageCollator(processor, skip_bad_samples=True)(samples[:1])
    assert int(clean[SKIPPED_SAMPLES_KEY]) == 0
    with pytest.raises(BadSampleError, match=r"2 bad samples in the batch(.|\n)*All 2 samples of the batch are bad"):
        VisionLanguageCollator(processor, skip_bad_samples=True)([samples[1], samples[3]])


def test_processor_errors_are_named_by_sample():
    # Qwen's image processor rejects an aspect ratio above 200 for the whole batch; the collator finds the sample.
    _, processor = _family("qwen2_5_vl")
    samples = _indexed([_sample(size=(64, 48)), _sample(size=(2000, 8)), _sample(size=(48, 96))], start=5)
    with pytest.raises(
        BadSampleError, match=r"dataset index 6: the processor rejected it: ValueError: .*aspect ratio"
    ):
        VisionLanguageCollator(processor)(samples)
    batch = VisionLanguageCollator(processor, skip_bad_samples=True)(samples)
    assert batch["image_grid_thw"].shape[0] == 2 and int(batch[SKIPPED_SAMPLES_KEY]) == 1


def test_load_image_sources(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(_png())
    import base64

    encoded = base64.b64encode(_png()).decode()
    for source in (
        str(path),
        path,
        _png(),
        encoded,
        f"data:image/png;base64,{encoded}",
        {"bytes": _png(), "path": None},
    ):
        assert load_image(source).getpixel((0, 0))[:3] == RED
    with pytest.raises(FileNotFoundError, match=f"file not found: {re.escape(str(tmp_path / 'blue.png'))}"):
        load_image({"bytes": None, "path": str(tmp_path / "blue.png")})
    with pytest.raises(TypeError, match="Unsupported image of type int"):
        load_image(3)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: errors raised while reading a sample (inside the DataLoader) reach the collator with the sample's index.


class _Flaky(torch.utils.data.Dataset):
    """A torch dataset whose `__getitem__` fails for some indices, as a dataset reading files would."""

    def __init__(self, samples, failing):
        self.samples, self.failing = samples, failing

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if index in self.failing:
            raise OSError(f"cannot read shard for sample {index}")
        return self.samples[index]


def _image_dataset(column: str = "images"):
    """A `datasets.Dataset` of 6 samples with an image column (`images`: a list of images, `image`: one image); the
    image of sample 2 is undecodable, that of sample 4 a missing file."""
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": _png(), "path": None} for _ in range(6)]
    images[2] = {"bytes": b"no image", "path": None}
    images[4] = {"bytes": None, "path": "/no/such/image.png"}
    content = [{"type": datasets.Value("string"), "text": datasets.Value("string")}]
    features = datasets.Features(
        {
            column: datasets.List(datasets.Image()) if column == "images" else datasets.Image(),
            "messages": [{"role": datasets.Value("string"), "content": content}],
        }
    )
    rows = {
        column: [[i] for i in images] if column == "images" else images,
        "messages": [make_sample(0)["messages"]] * 6,
    }
    return datasets.Dataset.from_dict(rows, features=features)


def _loader(dataset, collator, num_workers=2):
    return torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=num_workers)


def test_image_feature_decoding_errors_name_the_index(processor):
    dataset = _image_dataset()
    with pytest.raises(Exception, match="cannot identify image file"):  # `datasets` decodes in __getitem__
        dataset[2]
    indexed = index_samples(dataset)
    assert type(indexed) is type(dataset) and indexed[3][SAMPLE_INDEX_KEY] == 3
    with pytest.raises(BadSampleError, match=r"dataset index 2: images\[0\] \(image bytes\): undecodable"):
        list(_loader(indexed, VisionLanguageCollator(processor)))
    with pytest.raises(BadSampleError, match=r"dataset index 4: images\[0\]: file not found: /no/such/image\.png"):
        list(_loader(indexed.select([4, 5]), VisionLanguageCollator(processor), num_workers=0))
    # A top-level Image column is cast too; a second index_samples is refused.
    single = index_samples(_image_dataset("image"))
    assert single.features["image"].decode is False
    with pytest.raises(BadSampleError, match=r"dataset index 2: image \(image bytes\): undecodable"):
        VisionLanguageCollator(processor)([single[1], single[2]])
    with pytest.raises(ValueError, match="applied twice"):
        index_samples(indexed)
    with pytest.raises(TypeError, match=r"map-style dataset(.|\n)*decode\(False\)"):
        index_samples(dataset.to_iterable_dataset())


def test_skipped_counter_from_worker_processes(processor):
    """With two DataLoader workers, the counts in the batches add up to the bad samples of the dataset."""
    indexed = index_samples(_image_dataset())
    batches = list(_loader(indexed, VisionLanguageCollator(processor, skip_bad_samples=True)))
    assert sum(int(b[SKIPPED_SAMPLES_KEY]) for b in batches) == 2
    assert sum(b["input_ids"].shape[0] for b in batches) == 4


def test_indexed_dataset_reports_getitem_errors(processor):
    dataset = IndexedDataset(_Flaky(make_dataset(4), failing={1}))
    assert index_samples(make_dataset(2))[1][SAMPLE_INDEX_KEY] == 1
    with pytest.raises(
        BadSampleError, match=r"dataset index 1: reading the sample failed: OSError: cannot read shard"
    ):
        list(_loader(dataset, VisionLanguageCollator(processor)))
    batches = list(_loader(dataset, VisionLanguageCollator(processor, skip_bad_samples=True)))
    assert [int(b[SKIPPED_SAMPLES_KEY]) for b in batches] == [1, 0]


def test_trainer_run_completes_and_logs_skipped_samples(tmp_path):
    """With two DataLoader workers, the trainer pops the count from each batch and logs it as sparse/skipped_samples."""
    model, processor = tiny_llava()
    dataset = IndexedDataset(_Flaky(make_dataset(8), failing={0, 5}))
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, dataloader_num_workers=2),
        train_dataset=dataset,
        data_collator=VisionLanguageCollator(processor, skip_bad_samples=True),
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.5),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and sum(entry["sparse/skipped_samples"] for entry in logs) == 2


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_a_batch_starting_with_a_text_only_sample_collates(family):
    """Their processors cannot tensorise a batch whose first sample has no image: the collator puts images first."""
    model, processor = _family(family)
    samples = _family_samples(family)
    batch = _collate(processor, [samples[2], samples[0]])
    assert model(**batch).loss.isfinite()

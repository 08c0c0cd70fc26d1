"""Batched greedy generation with left padding, in full and compressed visual-token modes."""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import make_dataset, tiny_llava

from hf_sparse_mllm.evaluation import generate_answers, generation


@pytest.fixture(scope="module")
def built():
    return tiny_llava()


def _reference_answer(model, processor, sample, max_new_tokens):
    """One sample at a time, no padding: what batched left-padded generation must reproduce."""
    prompt = generation.render_prompt(processor, sample["messages"])
    inputs = processor(text=[prompt], images=sample["images"], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_batched_equals_one_by_one(built):
    model, processor = built
    samples = make_dataset(5)  # questions of two lengths: batches need padding
    answers = generate_answers(model, processor, samples, batch_size=4, max_new_tokens=4, progress=False)
    assert all(isinstance(a, str) for a in answers) and len(answers) == 5
    assert answers == [_reference_answer(model, processor, s, 4) for s in samples]
    # The tokenizer's own padding side is left alone.
    assert processor.tokenizer.padding_side == "right"


def test_prompt_leaves_out_the_answer(built):
    _, processor = built
    sample = make_dataset(1)[0]
    prompt = generation.render_prompt(processor, sample["messages"])
    assert prompt.endswith("assistant :") and "red" not in prompt


@pytest.mark.parametrize("compressor", ["divprune", "pool", "random", "redundancy", "cls_attention"])
def test_compressed_full_budget_equals_full(built, compressor):
    model, processor = built
    samples = make_dataset(4)
    full = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=4, progress=False)
    same = generate_answers(
        model, processor, samples, batch_size=3, max_new_tokens=4, progress=False,
        token_compressor=compressor, keep_ratio=1.0,
    )  # fmt: skip
    assert same == full
    half = generate_answers(
        model, processor, samples, max_new_tokens=2, progress=False, token_compressor=compressor, keep_ratio=0.5
    )
    assert len(half) == 4 and all(isinstance(answer, str) for answer in half)


def test_compressed_runs_and_shortens_the_prefill(built):
    model, processor = built
    samples = make_dataset(4)
    lengths = {}

    def record(mode):
        def hook(module, args, kwargs):
            lengths.setdefault(mode, kwargs["inputs_embeds"].shape[1])  # the first call is the prefill

        return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)

    handle = record("full")
    try:
        generate_answers(model, processor, samples, max_new_tokens=3, progress=False)
    finally:
        handle.remove()
    handle = record("sparse")
    try:
        answers = generate_answers(
            model, processor, samples, max_new_tokens=3, progress=False, token_compressor="divprune", num_keep=4
        )
    finally:
        handle.remove()
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert lengths["full"] - lengths["sparse"] == 16 - 4
    # No hook is left behind on the model.
    assert not model.model.multi_modal_projector._forward_hooks


def test_bad_input(built):
    model, processor = built
    samples = make_dataset(2)
    with pytest.raises(ValueError, match="Unknown token compressor 'nope'"):
        generate_answers(model, processor, samples, token_compressor="nope", keep_ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="needs keep_ratio"):
        generate_answers(model, processor, samples, token_compressor="divprune", progress=False)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        generate_answers(model, processor, samples, token_compressor="divprune", keep_ratio=1.5, progress=False)
    with pytest.raises(ValueError, match="no 'messages'"):
        generate_answers(model, processor, [{"question": "x"}], progress=False)


def test_docstring_examples():
    result = doctest.testmod(generation, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize(
    "compression", [{}, {"token_compressor": "divprune", "num_keep": 4}], ids=["full", "divprune"]
)
def test_continuation_logprob(compression):
    model, processor = tiny_llava(seed=3)
    # Only colour words can be generated, so the greedy answer is a word with a known continuation.
    colours = processor.tokenizer.convert_tokens_to_ids(["red", "green", "blue"])
    with torch.no_grad():
        keep = model.lm_head.weight[colours].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[colours] = keep
    sample = make_dataset(1)[0]
    greedy = generate_answers(model, processor, [sample], max_new_tokens=1, progress=False, **compression)[0]
    other = next(w for w in ("red", "green", "blue") if w != greedy)
    prompt = generation.render_prompt(processor, sample["messages"])
    logprob, is_greedy = generation.continuation_logprob(
        model, processor, prompt, sample["images"], greedy, **compression
    )
    other_logprob, other_greedy = generation.continuation_logprob(
        model, processor, prompt, sample["images"], other, **compression
    )
    assert is_greedy and not other_greedy and logprob > other_logprob
    if not compression:  # against a plain forward pass over the prompt
        inputs = processor(text=[prompt], images=sample["images"], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            last = model(**inputs).logits[0, -1].log_softmax(-1)
        assert logprob == pytest.approx(last[processor.tokenizer.convert_tokens_to_ids(greedy)].item(), abs=1e-5)
    two_words, _ = generation.continuation_logprob(
        model, processor, prompt, sample["images"], f"{greedy} {other}", **compression
    )
    assert two_words < logprob  # one more token, one more (negative) log-probability


def test_messages_from_context():
    assert generation.messages_from_context("a <image> b <image>", 2)[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "image"},
        {"type": "text", "text": "b"},
        {"type": "image"},
    ]
    with pytest.raises(ValueError, match="1 '<image>' markers but the sample has 2 images"):
        generation.messages_from_context("<image> b", 2)

"""Every supported architecture x {sparsity off, DivPrune fast step, slow step with distillation, layer skipping}.

Each family is a tiny model built offline (`hf_sparse_mllm.tiny`), trained on a batch with images of different sizes
and a text-only sample, through the same code as LLaVA-1.5.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import training_args
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.adapters import ArchitectureAdapter, adapter_class, get_adapter, supported_model_types
from hf_sparse_mllm.compressors import get_compressor
from hf_sparse_mllm.data.collator import VisionLanguageCollator, is_prefix_lm
from hf_sparse_mllm.dualspeed import next_token_targets
from hf_sparse_mllm.evaluation import evaluate, get_task
from hf_sparse_mllm.sparse_forward import Compression, compress_batch, sparse_hooks
from hf_sparse_mllm.tiny import build_tiny_model_and_processor

FAMILIES = supported_model_types()
# M-RoPE families: their adapter gives the full sequence's 3-D positions, which kept tokens keep.
MROPE_FAMILIES = [
    f for f in FAMILIES if adapter_class(f).full_position_ids is not ArchitectureAdapter.full_position_ids
]
WORDS = ["what", "color", "is", "it", "red", "blue", "green"]
SIZES = [(40, 30), (30, 60)]  # width x height: different aspect ratios, so variable-count families differ


def _sample(sizes, answer="red"):
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "what color is it ?"}]
    return {
        "images": [Image.new("RGB", size, (200, 30, 30)) for size in sizes],
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


SAMPLES = [_sample([SIZES[0]]), _sample([SIZES[1]], "blue"), _sample([], "green")]


def _samples(family):
    """The matrix's samples; a prefix-LM processor (PaliGemma's) needs an image in every one: the third gets one."""
    _, processor = _built(family)
    return [*SAMPLES[:2], _sample([SIZES[0]], "green")] if is_prefix_lm(processor) else SAMPLES


@functools.cache
def _built(family):
    return build_tiny_model_and_processor(family, words=WORDS)


def _model_and_batch(family):
    model, processor = _built(family)
    model = copy.deepcopy(model)
    return model, processor, VisionLanguageCollator(processor)(_samples(family))


def _train(tmp_path, family, steps=2, **recipe):
    model, processor, _ = _model_and_batch(family)
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=steps, per_device_train_batch_size=3),
        train_dataset=_samples(family) * steps,
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(stage="instruction", **recipe),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # the isolator included
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == steps and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return trainer, logs, changed


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_off_loss_equals_the_models_own(tmp_path, family):
    model, _, batch = _model_and_batch(family)
    model.train()
    n_items = (batch["labels"][:, 1:] != -100).sum()
    expected = model(**batch, num_items_in_batch=n_items).loss.item()
    trainer = SparseMLLMTrainer(
        model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig(token_compressor=None)
    )
    assert trainer.training_step(model, dict(batch), num_items_in_batch=n_items).item() == pytest.approx(
        expected, abs=1e-5
    )


def _assert_keeping_every_token_gives_the_full_logits(model, batch):
    adapter = get_adapter(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    compression = Compression(get_compressor("divprune"), keep_ratio=1.0)
    short = compress_batch(adapter, batch, compression)
    assert short.inputs["input_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        full = model(**inputs, use_cache=False).logits
        with sparse_hooks(adapter, short, compression):
            same = model(**{k: v for k, v in short.inputs.items() if k != "labels"}, use_cache=False).logits
    answers = next_token_targets(batch["labels"]) != -100
    torch.testing.assert_close(same[answers], full[answers], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_gives_the_full_logits(family):
    model, _, batch = _model_and_batch(family)
    _assert_keeping_every_token_gives_the_full_logits(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_steps_train_and_export_a_plain_model(tmp_path, family):
    trainer, logs, changed = _train(tmp_path, family, token_compressor="divprune", keep_ratio=0.25, slow_mode_prob=0)
    assert "sparse_mllm_isolator.tokens" in changed and len(changed) > 10
    assert all(0 < e["sparse/visual_tokens_per_image"] < _full_tokens_per_image(family) for e in logs)
    trainer.save_model(str(tmp_path / "export"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert type(reloaded) is type(trainer.model)
    fresh, _ = _built(family)
    fresh.save_pretrained(tmp_path / "fresh")
    assert _checkpoint_keys(tmp_path / "export") == _checkpoint_keys(tmp_path / "fresh")


@pytest.mark.parametrize("family", FAMILIES)
def test_slow_steps_distil_from_the_fast_mode(tmp_path, family):
    _, logs, changed = _train(tmp_path, family, steps=1, token_compressor="divprune", slow_mode_prob=1.0)
    (log,) = logs
    assert log["sparse/slow_step"] == 1.0
    assert {"sparse/teacher_ce", "sparse/student_ce", "sparse/kl"} <= log.keys() and log["sparse/kl"] >= 0
    # The teacher (fast mode, isolator) runs without gradients; the student sees every token and no isolator.
    assert "sparse_mllm_isolator.tokens" not in changed and len(changed) > 10


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_skipping_trains_without_the_skipped_layer(tmp_path, family):
    recipe = dict(layer_skip_policy="fixed", skip_layers=[1], protect_layers=0, slow_mode_prob=0.0)
    trainer, logs, changed = _train(tmp_path, family, token_compressor="divprune", **recipe)
    assert all(e["sparse/skipped_layers"] == 1 for e in logs)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    layers = trainer._decoder.layers
    assert not {names[id(p)] for p in layers[1].parameters()} & changed
    assert {names[id(p)] for p in layers[0].parameters()} <= changed


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_evaluation_runs(tmp_path, family):
    from datasets import Dataset, DatasetDict

    model, processor = _built(family)
    docs = [{"image": s["images"][0], "question": "what color is it ?", "answer": a} for s, a in zip(SAMPLES, "rb")]
    DatasetDict({"testdev": Dataset.from_list(docs)}).save_to_disk(str(tmp_path / "docs"))
    task = get_task("gqa", dataset_path=str(tmp_path / "docs"), max_new_tokens=2)
    results = evaluate(model, processor, [task], token_compressor="divprune", keep_ratio=0.25, progress=False)
    config = results["config"]
    assert config["mode"] == "compressed" and results["results"]["gqa"]["samples"] == 2
    assert 0 < config["kept_visual_tokens_per_image"] < config["visual_tokens_per_image"]


def _full_tokens_per_image(family):
    model, processor = _built(family)
    batch = VisionLanguageCollator(processor)(_samples(family))
    layout = get_adapter(model).layout(batch)
    return sum(run.length for run in layout.runs) / layout.num_images


def _checkpoint_keys(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_kept_tokens_keep_their_full_sequence_mrope_positions(family):
    model, _, batch = _model_and_batch(family)
    adapter = get_adapter(model)
    keys = ("image_grid_thw", "attention_mask")
    own, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], **{k: batch[k] for k in keys}
    )
    compression = Compression(get_compressor("divprune"), keep_ratio=0.5)
    short = compress_batch(adapter, batch, compression)
    seen = {}

    def record(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    with torch.no_grad(), sparse_hooks(adapter, short, compression):
        # Registered after the sparse hook: sees the positions the language model gets.
        hook = adapter.language_model().register_forward_pre_hook(record, with_kwargs=True)
        model(**{k: v for k, v in short.inputs.items() if k != "labels"}, use_cache=False)
        hook.remove()
    positions = seen["positions"]
    image_id = adapter.image_token_id
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        short_real = short.inputs["attention_mask"][row].bool()
        text, short_text = (
            real & (batch["input_ids"][row] != image_id),
            short_real & (short.inputs["input_ids"][row] != image_id),
        )
        # The text, after an image too, keeps its full-sequence positions.
        torch.testing.assert_close(positions[:, row, short_text], own[:, row, text])
        for run, (_, slot), iso, offsets in zip(short.layout.runs, short.run_slots, short.isolators, short.selection):
            if run.row != row:
                continue
            kept = positions[:, row, slot + iso : slot + iso + len(offsets)]
            torch.testing.assert_close(kept, own[:, row, run.start + offsets])
            assert len(offsets) == max(1, round(0.5 * run.length))


@pytest.mark.parametrize("family", MROPE_FAMILIES)
@pytest.mark.parametrize("compressor", [None, "divprune"])
def test_mrope_without_mm_token_type_ids_is_a_clear_error(tmp_path, family, compressor):
    """Qwen2.5-VL would silently fall back to 1-D positions: the trainer refuses the batch instead."""
    model, _, batch = _model_and_batch(family)
    del batch["mm_token_type_ids"]
    trainer = SparseMLLMTrainer(
        model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig(token_compressor=compressor)
    )
    with pytest.raises(ValueError, match="needs `mm_token_type_ids`"):
        trainer.training_step(model, batch)


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe", "glm46v"])
def test_glm_video_frames_written_with_the_image_placeholder_are_left_uncompressed(family):
    """GLM-4V's processor writes a video frame as image placeholders marked 2 in `mm_token_type_ids`."""
    model, _, batch = _model_and_batch(family)
    rows, image_token = batch["input_ids"].shape[0], model.config.image_token_id
    frame = {"input_ids": torch.full((rows, 6), image_token), "mm_token_type_ids": torch.full((rows, 6), 2)}
    inputs = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        inputs[key] = torch.cat([batch[key], frame.get(key, torch.ones(rows, 6, dtype=batch[key].dtype))], dim=1)
    inputs["labels"] = torch.cat([batch["labels"], torch.full((rows, 6), -100)], dim=1)
    inputs["video_grid_thw"] = torch.tensor([[1, 4, 6]] * rows)  # one frame of 2 x 3 merged patches per row
    adapter = get_adapter(model)
    assert adapter.layout(inputs).runs == adapter.layout(batch).runs  # the images only
    short = compress_batch(adapter, inputs, Compression(get_compressor("divprune"), keep_ratio=0.25))
    assert ((short.inputs["mm_token_type_ids"] == 2) & (short.inputs["input_ids"] == image_token)).sum() == 6 * rows


def test_mistral3_puts_the_isolator_once_per_image_before_its_first_row(tmp_path):
    model, _, batch = _model_and_batch("mistral3")
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path),
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25, num_isolator_tokens=4),
    )
    compression = Compression(get_compressor("divprune"), keep_ratio=0.25, isolator=trainer.isolator)
    short = compress_batch(get_adapter(model), batch, compression)
    rows_per_image = [sum(run.image == image for run in short.layout.runs) for image in range(2)]
    assert min(rows_per_image) > 1  # the images have several rows, only the first gets the isolator
    assert sum(short.isolators) == 4 * 2
    placeholders = (short.inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert placeholders == sum(short.kept) + 4 * 2
    with torch.no_grad(), sparse_hooks(get_adapter(model), short, compression):
        loss = model(**short.inputs, use_cache=False).loss  # the features fill exactly the placeholders left
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["llava_next", "llava_next_video", "llava_onevision"])
def test_two_images_in_a_sample_beside_a_text_only_sample_train(tmp_path, family):
    model, processor = _built(family)
    samples = [_sample(SIZES, "red"), _sample([], "green")]
    trainer = SparseMLLMTrainer(
        model=copy.deepcopy(model),
        args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, train_sampling_strategy="sequential"),
        train_dataset=samples * 2,
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25, slow_mode_prob=0.5, seed=1),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert {e["sparse/slow_step"] for e in logs} == {0.0, 1.0}


@pytest.mark.parametrize("compressor", ["pool", "random", "redundancy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_grid_and_selection_compressor_runs_a_fast_forward(family, compressor):
    """The support table's claim: grid-based (`pool`, `redundancy`) and random selection work on every family."""
    model, _, batch = _model_and_batch(family)
    adapter = get_adapter(model)
    compression = Compression(get_compressor(compressor), keep_ratio=0.25, seed=0)
    short = compress_batch(adapter, batch, compression)
    with sparse_hooks(adapter, short, compression):
        loss = model(**short.inputs, use_cache=False).loss
    assert torch.isfinite(loss) and short.inputs["input_ids"].shape[1] < batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_cls_attention_is_a_clear_error_where_there_is_no_cls_tower(family):
    model, _, batch = _model_and_batch(family)
    adapter = get_adapter(model)
    compression = Compression(get_compressor("cls_attention"), keep_ratio=0.25)
    short = compress_batch(adapter, batch, compression)
    with pytest.raises(ValueError, match=r"needs \['cls_attention'\]"):
        with sparse_hooks(adapter, short, compression):
            model(**short.inputs, use_cache=False)


def test_layer_skipping_needs_no_adapter(tmp_path):
    """Without compression any model whose decoder layers are found generically trains with layer skipping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    )
    recipe = SparseMLLMConfig(token_compressor=None, layer_skip_policy="fixed", skip_layers=[1], stage="instruction")
    trainer = SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=recipe)
    ids = torch.randint(0, 32, (2, 8))
    trainer.training_step(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert all(p.grad is None for p in model.model.layers[1].parameters())
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_the_base_class_is_the_adapter_of_a_family_following_the_common_layout():
    """What the no-adapter error promises: Cohere2-Vision (not registered) writes each image tile as one run of
    `image_token_id` placeholders (then a line-break token), so `register_adapter(...)(ArchitectureAdapter)` compresses
    it: keeping every token gives the full logits, and DivPrune shortens every tile's run."""
    from transformers import (
        Cohere2Config,
        Cohere2VisionConfig,
        Cohere2VisionForConditionalGeneration,
        SiglipVisionConfig,
    )

    from hf_sparse_mllm.adapters import base, register_adapter

    image, line_break, start, end, pad = 60, 59, 57, 58, 0
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = Cohere2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=pad,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    config = Cohere2VisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image,
        downsample_factor=2,
        alignment_intermediate_size=64,
    )
    torch.manual_seed(0)
    model = Cohere2VisionForConditionalGeneration(config).eval()

    def tiles(count):  # 16 px tiles of 4 px patches, pixel-shuffled by 2: 4 tokens per tile
        return [start] + ([image] * 4 + [line_break]) * count + [end]

    rows = [[1, 5, *tiles(3), 6, 7, 8, 9, 2], [1, 5, *tiles(2), 6, 10, 11, 2], [1, 5, 6, 7, 12, 13, 2]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        labels[i, len(row) - 3 : len(row)] = input_ids[i, len(row) - 3 : len(row)]
    batch = {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad).long(),
        "labels": labels,
        "pixel_values": torch.rand(5, 3, 16, 16),  # the tiles of both images, in order
    }
    assert "cohere2_vision" not in supported_model_types()
    register_adapter("cohere2_vision")(ArchitectureAdapter)
    try:
        adapter = get_adapter(model)
        assert [run.length for run in adapter.layout(batch).runs] == [4] * 5
        _assert_keeping_every_token_gives_the_full_logits(model, batch)
        compression = Compression(get_compressor("divprune"), keep_ratio=0.25)
        short = compress_batch(adapter, batch, compression)
        with torch.no_grad(), sparse_hooks(adapter, short, compression):
            loss = model(**short.inputs, use_cache=False).loss
        assert torch.isfinite(loss) and short.kept == [1] * 5
    finally:
        del base._ADAPTERS["cohere2_vision"]

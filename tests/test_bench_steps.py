"""`make bench-steps` smoke path: every variant is stepped, timed and measured, and the forced modes take effect."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import bench_steps


@pytest.mark.slow
def test_step_benchmark_times_every_variant(tmp_path):
    threads = torch.get_num_threads()
    args = ["--shapes", "vit196", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--output", str(tmp_path)]
    try:
        bench_steps.main(args)
    finally:
        torch.set_num_threads(threads)  # main() sets the benchmark's own thread count
    shape = json.loads((tmp_path / "steps.json").read_text())["shapes"]["vit196"]
    variants = shape["variants"]
    assert set(variants) == {*bench_steps.VARIANTS, "mix", "mix+skip25", "mix+skip50"}
    assert shape["visual_tokens_kept_per_image"] == 20  # round(0.1 * 196)
    assert 0 < shape["compression_share_of_fast_step_cpu_time"] < 1 and shape["tower_flops"] > 0
    memory = {name: v["saved_activations_mb"] for name, v in variants.items()}
    # Each forced mode runs what it says: compressed fast steps, all-token slow steps, skipped layers.
    assert memory["fast"] < memory["skip25"] < memory["stock"] and memory["fast"] < memory["slow"]
    assert memory["fast+skip50"] < memory["fast+skip25"] < memory["fast"]
    assert "| vit196 | 1 | fast |" in (tmp_path / "steps.md").read_text()


@pytest.mark.slow
def test_step_benchmark_llava_next_and_qwen_shapes(tmp_path):
    """The anyres and M-RoPE shapes: fast steps shorten the sequence to the kept tokens plus the isolator, per unit."""
    threads = torch.get_num_threads()
    args = ["--shapes", "llavanext,qwen25vl", "--steps", "1", "--warmup", "0", "--batch-size", "1"]
    try:
        bench_steps.main([*args, "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    shapes = json.loads((tmp_path / "steps.json").read_text())["shapes"]
    # 672 x 672 px: a 336 px base tile + a 2 x 2 grid of 24 x 24 patches, a newline feature after each grid row.
    assert shapes["llavanext"]["visual_tokens_per_image"] == 576 + 48 * 49
    # Five 576-token units at 10 % (58 each), the 48 newline rows kept as they are.
    assert shapes["llavanext"]["visual_tokens_kept_per_image"] == 5 * 58 + 48
    assert shapes["qwen25vl"]["visual_tokens_per_image"] == 1024  # (896 / 14 / 2) ** 2
    assert shapes["qwen25vl"]["visual_tokens_kept_per_image"] == 102
    for shape in shapes.values():
        assert set(shape["variants"]) == {"stock", "fast", "slow", "mix"}
        text = shape["seq_len"] - shape["visual_tokens_per_image"]
        assert shape["fast_seq_len"] == text + shape["visual_tokens_kept_per_image"] + shape["isolator_tokens"]
        assert shape["variants"]["fast"]["flop_ideal_speedup"] > 4


def test_shape_vision_config_sets_the_tower_geometry():
    """The Qwen2.5-VL shape's tower gets the real model's head geometry over the builder's, before its weights are
    drawn, and the batch still runs through it."""
    shape = bench_steps.SHAPES["qwen25vl"]
    shape = dataclasses.replace(
        shape, builder=dict(shape.builder, min_pixels=224 * 224, max_pixels=224 * 224), image_size=(224, 224)
    )
    model, batch = bench_steps.build(shape, 1, 16, "cpu")
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.num_heads, vision.window_size) == (80, 1, 112)
    attention = model.model.visual.blocks[0].attn
    assert attention.head_dim == 80 and model.model.visual.patch_embed.proj.out_channels == 80
    assert not any(p.requires_grad for p in model.model.visual.blocks.parameters())
    assert all(p.requires_grad for p in model.model.visual.merger.parameters())
    with torch.no_grad():
        features = model.model.get_image_features(**bench_steps.visual_inputs(batch)).pooler_output
    assert features[0].shape == (64, 256)  # (224 / 14 / 2) ** 2 tokens, the decoder's width


@pytest.mark.parametrize("forced,schedule", [("fast", 1.0), ("slow", 0.0), ("plain", 1.0)])
def test_forced_mode_overrides_the_schedule(tmp_path, forced, schedule):
    """Every step takes the forced mode, with that mode's skipped layers, whatever the schedule says."""
    from transformers import TrainingArguments

    from hf_sparse_mllm import SparseMLLMConfig
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    model, _ = build_tiny_llava_and_processor("test", words=["red"], num_hidden_layers=3)
    config = SparseMLLMConfig(
        token_compressor=None if forced == "plain" else "divprune",
        slow_mode_prob=schedule,
        stage="instruction",
        layer_skip_policy="fixed",
        skip_layers=[1],
        protect_layers=0,
    )
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    trainer = bench_steps.ForcedModeTrainer(model=model, args=args, sparse_config=config, forced_mode=forced)
    for step in range(3):
        plan = trainer.plan_step(step)
        assert plan.mode == ("fast" if forced == "plain" else forced)
        assert plan.skipped_layers == (() if forced == "slow" else (1,))

"""`make bench-steps` smoke path: every variant is stepped, timed and measured, and the forced modes take effect."""

from __future__ import annotations

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
    assert shape["visual_tokens_kept"] == 20  # round(0.1 * 196)
    memory = {name: v["saved_activations_mb"] for name, v in variants.items()}
    # Each forced mode runs what it says: compressed fast steps, all-token slow steps, skipped layers.
    assert memory["fast"] < memory["skip25"] < memory["stock"] and memory["fast"] < memory["slow"]
    assert memory["fast+skip50"] < memory["fast+skip25"] < memory["fast"]
    assert "| vit196 | fast |" in (tmp_path / "steps.md").read_text()

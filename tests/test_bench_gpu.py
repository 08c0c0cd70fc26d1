"""The GPU step benchmark (`benchmarks/bench_gpu.py`): its `--smoke` run on CPU, the batches it builds without a
tokenizer, and that it needs nothing beyond torch, transformers and the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import bench_gpu
from hf_sparse_mllm.adapters import get_adapter

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_run_measures_every_shape_and_writes_both_reports(tmp_path):
    report = bench_gpu.main(["--smoke", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert set(saved["shapes"]) == set(bench_gpu.SHAPES) and "incomplete" not in saved
    for name, shape in report["shapes"].items():
        assert set(shape["variants"]) == {"stock", "fast", "slow", "mix"}, name
        fast = shape["variants"]["fast"]
        assert fast["median_step_seconds"] > 0 and fast["samples_per_second"] > 0
        assert shape["largest_batch"]["fast"]["largest"]["batch_size"] == 2  # --smoke stops at its batch of 2
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| llava-next-7b |") == 4 + 1  # four step rows and the largest-batch row
    assert "Largest batch that fits" in table


@pytest.mark.parametrize("name", list(bench_gpu.SHAPES))
def test_a_benchmark_batch_has_one_image_run_of_the_models_own_length_per_sample(name):
    shape = replace(bench_gpu.SHAPES[name], layers=1, batch_size=3, text_tokens=12, answer_tokens=4, smoke=True)
    model = bench_gpu.build_model(shape, "cpu", torch.float32)
    n_visual = bench_gpu.visual_tokens_per_image(shape, model, "cpu", torch.float32)
    batch = bench_gpu.make_batch(shape, model, 3, n_visual, "cpu", torch.float32)
    layout = get_adapter(model).layout(batch)  # raises when placeholders and images disagree
    assert [run.length for run in layout.runs] == [n_visual] * 3
    assert ((batch["labels"] != -100).sum(1) == shape.answer_tokens).all()
    trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.")}
    projector = {"llava": {"multi_modal_projector"}, "llava_next": {"multi_modal_projector", "image_newline"}}
    assert trained == {"language_model"} | projector.get(shape.family, {"visual"})
    if shape.family == "qwen2_5_vl":  # Qwen's projector is the tower's merger: only it is trained there
        visual = dict(model.model.visual.named_parameters())
        assert {n for n, p in visual.items() if p.requires_grad} == {n for n in visual if n.startswith("merger.")}


@pytest.mark.slow
def test_the_benchmark_runs_without_trl_datasets_or_the_harness(tmp_path):
    # The GPU machine it is meant for has torch, transformers and accelerate but no trl or datasets: make them
    # unimportable (transformers then sees datasets as absent too) and run every shape.
    code = (
        "import sys\n"
        "for name in ('trl', 'datasets', 'benchmarks.harness'):\n"
        "    sys.modules[name] = None\n"
        "from benchmarks import bench_gpu\n"
        f"bench_gpu.main(['--smoke', '--output', {str(tmp_path)!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads((tmp_path / "gpu.json").read_text())["shapes"]) == set(bench_gpu.SHAPES)

"""`make demo` smoke path: the quick demo runs end to end, writes its report and a sparse model that reloads."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_sparse_mllm.demo import curve_steps, exact_match_accuracy, format_table

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo = _load_script("demo")
    threads = torch.get_num_threads()
    try:
        report = demo.main(
            ["--quick", "--output", str(out / "report"), "--data-dir", str(out / "data"), "--no-progress"]
        )
    finally:
        torch.set_num_threads(threads)
    return out / "report", report


def test_quick_demo_writes_the_report(quick_demo):
    out, report = quick_demo
    saved = json.loads((out / "report.json").read_text())
    assert {"speedup", "accuracy_retained", "runs", "blind_baseline", "time_to_baseline_accuracy"} <= saved.keys()
    # The smoke run answers nothing right, so there is no accuracy to reach, and the report says so.
    assert saved["runs"]["baseline"]["curve"][-1]["accuracy"]["overall"] == 0.0
    assert saved["time_to_baseline_accuracy"] is None
    assert "the baseline's final curve accuracy is 0" in (out / "report.md").read_text()
    assert saved["speedup"] > 0
    assert set(saved["runs"]) == {"baseline", "sparse"}
    for run in saved["runs"].values():
        assert run["train_seconds"] > 0 and run["train_cpu_seconds"] > 0
        assert 0.0 <= run["accuracy"] <= 1.0
        assert {"overall", "color", "shape", "exist"} <= run["accuracy_by_family"].keys()
        assert run["loss_history"] and run["curve"]
    assert saved["runs"]["baseline"]["trainer"] == "Trainer"
    assert saved["runs"]["sparse"]["trainer"] == "SparseMLLMTrainer"
    assert saved["runs"]["sparse"]["sparse_recipe"]["token_compressor"] == "divprune"
    for name in ("report.md", "loss.png", "accuracy_vs_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "| baseline |" in (out / "report.md").read_text()


def test_quick_demo_sparse_model_reloads(quick_demo, caplog):
    out, _ = quick_demo
    model_dir = out / "sparse_model"
    with caplog.at_level(logging.WARNING):
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert model.config.model_type == "llava"
    assert not [r for r in caplog.records if "unexpected" in r.message.lower() or "missing" in r.message.lower()]
    assert (model_dir / "sparse_mllm_config.json").is_file()
    processor = AutoProcessor.from_pretrained(model_dir)
    from hf_sparse_mllm.data.vqa import load_vqa_dataset

    data_dirs = list((out.parent / "data").iterdir())
    test = load_vqa_dataset(str(data_dirs[0]))["test"].select(range(4))
    from hf_sparse_mllm.evaluation import generate_answers

    answers = generate_answers(model.eval(), processor, test, max_new_tokens=2, progress=False)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_exact_match_and_table():
    samples = {"answer": ["red", "yes", "2"], "family": ["color", "exist", "count"]}
    accuracy = exact_match_accuracy([" Red ", "no", "2"], samples)
    assert accuracy == {"overall": pytest.approx(2 / 3), "color": 1.0, "exist": 0.0, "count": 1.0}
    run = {"train_seconds": 10.0, "accuracy": 2 / 3, "accuracy_by_family": accuracy}
    report = {"runs": {"baseline": run, "sparse": {**run, "train_seconds": 5.0}}, "blind_baseline": accuracy}
    table = format_table(report)
    assert "| sparse | 5.0 | 2.00x | - | - | 66.7 |" in table


def test_docstring_examples():
    import doctest

    import hf_sparse_mllm.demo

    assert doctest.testmod(hf_sparse_mllm.demo).failed == 0


def test_time_to_accuracy():
    from hf_sparse_mllm.demo import time_to_accuracy, time_to_accuracy_sentence

    def curve(*points):
        return [{"step": s, "train_seconds": t, "accuracy": {"overall": a}} for s, t, a in points]

    base = curve((10, 10.0, 0.5), (20, 20.0, 0.8))
    result = time_to_accuracy(base, curve((10, 4.0, 0.79), (20, 8.0, 0.8)))
    assert result == {
        "target": 0.8,
        "baseline_seconds": 20.0,
        "sparse_seconds": 8.0,
        "sparse_step": 20,
        "speedup": 2.5,
    }
    assert "8 s for the sparse run (step 20), 20 s for the baseline: 2.50x" in time_to_accuracy_sentence(result)
    # The baseline is timed at its own first point at the target, not at its last point.
    early = time_to_accuracy(curve((10, 10.0, 0.8), (20, 20.0, 0.8)), curve((10, 5.0, 0.8)))
    assert early["baseline_seconds"] == 10.0 and early["speedup"] == 2.0
    missed = time_to_accuracy(base, curve((10, 4.0, 0.7)))
    assert missed["speedup"] is None and "did not reach" in time_to_accuracy_sentence(missed)
    assert time_to_accuracy([], base) is None
    assert time_to_accuracy(curve((3, 1.0, 0.0)), curve((3, 1.0, 0.0))) is None  # nothing to reach


def test_curve_steps():
    assert curve_steps(1500, 6) == [250, 500, 750, 1000, 1250, 1500]
    assert curve_steps(3, 6) == [1, 2, 3]


@pytest.mark.parametrize("image_size,image_first", [(64, False), (96, False), (64, True)])
def test_fast_collator_matches_stock_collator(image_size, image_first):
    from dataclasses import replace

    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.data.vqa import build_vqa_dataset
    from hf_sparse_mllm.demo import DEMO_PRESETS, FastVisionLanguageCollator, build_model

    config = replace(DEMO_PRESETS["quick"], image_size=image_size)
    _, processor = build_model(config)
    data = build_vqa_dataset(
        num_train=40, num_test=0, seed=3, image_size=image_size, cell_size=16, image_first=image_first
    )["train"]
    rows = [data[i] for i in range(len(data))]
    for start in (0, 16):
        fast = FastVisionLanguageCollator(processor)(rows[start : start + 16])
        stock = VisionLanguageCollator(processor)(rows[start : start + 16])
        assert fast.keys() == stock.keys()
        for key in stock:
            torch.testing.assert_close(fast[key], stock[key], atol=1e-6, rtol=0, msg=key)

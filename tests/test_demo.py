"""`make demo` smoke path: the quick demo runs end to end, writes its report and a sparse model that reloads, and
scores with the evaluation package's `sparse_vqa` task."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from benchmarks import demo
from benchmarks.harness import DEMO_PRESETS, DemoConfig, accuracy_by_family, curve_steps, dataset_name, format_table
from hf_sparse_mllm.evaluation import evaluate, get_task


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
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
    assert saved["kept_visual_tokens"] == DEMO_PRESETS["quick"].kept_visual_tokens == 4  # the compressor's budget
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


def test_quick_demo_accuracy_is_the_evaluation_packages(quick_demo):
    """The demo's accuracy is `evaluate(model, processor, ["sparse_vqa" on the demo's test split])` of the saved
    sparse model: the same numbers and the same answer to every question."""
    out, report = quick_demo
    model = AutoModelForImageTextToText.from_pretrained(out / "sparse_model")
    processor = AutoProcessor.from_pretrained(out / "sparse_model")
    data = out.parent / "data" / dataset_name(DEMO_PRESETS["quick"])
    results = evaluate(model, processor, [get_task("sparse_vqa", dataset_path=data)], progress=False)
    sparse = report["runs"]["sparse"]
    assert accuracy_by_family(results) == sparse["accuracy_by_family"]
    assert results["results"]["sparse_vqa"]["exact_match,none"] == sparse["accuracy"]
    # An untrained smoke model answers nothing right, so compare the answers themselves too.
    lines = (out / "sparse" / "eval" / "full" / "samples_sparse_vqa.jsonl").read_text().splitlines()
    demo_answers = [json.loads(line)["filtered_resps"] for line in lines]
    assert demo_answers == [s["filtered_resps"] for s in results["samples"]["sparse_vqa"]]
    assert len(demo_answers) == DEMO_PRESETS["quick"].test_samples


def test_harness_scoring_is_evaluate(quick_demo, tmp_path):
    """The harness's scoring (a curve point: the first `curve_samples` test questions) is `evaluate` on `sparse_vqa`,
    answer for answer, here on an untrained model, whose answers are varied words rather than the smoke run's empty
    ones."""
    from benchmarks.harness import build_model, score_vqa, vqa_task
    from hf_sparse_mllm.data.vqa import load_vqa_dataset

    out, _ = quick_demo
    config = DEMO_PRESETS["quick"]
    model, processor = build_model(config)
    data = out.parent / "data" / dataset_name(config)
    test = load_vqa_dataset(str(data))["test"]
    limit = config.curve_samples
    accuracy = score_vqa(model, processor, vqa_task(test), limit=limit, output_dir=tmp_path, progress=False)
    results = evaluate(model, processor, [f"sparse_vqa={data}"], limit=limit, progress=False)
    assert accuracy == accuracy_by_family(results)
    lines = (tmp_path / "samples_sparse_vqa.jsonl").read_text().splitlines()
    answers = [json.loads(line)["filtered_resps"][0] for line in lines]
    assert answers == [s["filtered_resps"][0] for s in results["samples"]["sparse_vqa"]]
    assert len(answers) == limit and len(set(answers)) > 3, answers


@pytest.mark.parametrize("image_first", [False, True])
def test_sparse_vqa_prompts_in_the_training_order(image_first):
    """`sparse_vqa` puts the image where the sample's conversation has it, so it prompts a model as it was trained."""
    from hf_sparse_mllm.data.vqa import build_vqa_dataset
    from hf_sparse_mllm.evaluation.generation import messages_from_context, render_prompt
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    _, processor = build_tiny_llava_and_processor("test", words=["what", "color"])
    docs = build_vqa_dataset(num_train=0, num_test=4, image_size=32, cell_size=8, image_first=image_first)["test"]
    task = get_task("sparse_vqa")
    for doc in docs:
        trained = render_prompt(processor, doc["messages"])
        assert render_prompt(processor, messages_from_context(task.prompt(doc), 1)) == trained
        assert (trained.index("<image>") < trained.index(doc["question"])) == image_first


def _sparse_vqa_accuracy(predictions, samples):
    """What the harness reports for `predictions`: the `sparse_vqa` task's per-sample scores and aggregation."""
    task = get_task("sparse_vqa")
    values = {}
    for prediction, answer, family in zip(predictions, samples["answer"], samples["family"]):
        doc = {"answer": answer, "family": family}
        for metric, value in task.process_results(doc, task.postprocess(prediction)).items():
            values.setdefault(metric, []).append(value)
    return accuracy_by_family({"results": {"sparse_vqa": task.aggregate(values)}})


def test_exact_match_and_table():
    samples = {"answer": ["red", "yes", "2"], "family": ["color", "exist", "count"]}
    accuracy = _sparse_vqa_accuracy([" Red ", "no", "2"], samples)
    assert accuracy == {"overall": pytest.approx(2 / 3), "color": 1.0, "exist": 0.0, "count": 1.0}
    run = {"train_seconds": 10.0, "accuracy": 2 / 3, "accuracy_by_family": accuracy}
    report = {"runs": {"baseline": run, "sparse": {**run, "train_seconds": 5.0}}, "blind_baseline": accuracy}
    table = format_table(report)
    assert "| sparse | 5.0 | 2.00x | - | - | 66.7 |" in table


@pytest.mark.parametrize("module", ["__init__", "presets", "data", "collator", "scoring", "runs"])
def test_docstring_examples(module):
    import doctest
    import importlib

    name = "benchmarks.harness" + ("" if module == "__init__" else f".{module}")
    assert doctest.testmod(importlib.import_module(name)).failed == 0


def test_time_to_accuracy():
    from benchmarks.harness import time_to_accuracy, time_to_accuracy_sentence

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
def test_batch_collator_matches_stock_collator(image_size, image_first):
    from benchmarks.harness import VQABatchCollator, build_model
    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.data.vqa import build_vqa_dataset

    config = DEMO_PRESETS["quick"].with_model(image_size=image_size)
    _, processor = build_model(config)
    data = build_vqa_dataset(
        num_train=40, num_test=0, seed=3, image_size=image_size, cell_size=16, image_first=image_first
    )["train"]
    rows = [data[i] for i in range(len(data))]
    for start in (0, 16):
        fast = VQABatchCollator(processor)(rows[start : start + 16])
        stock = VisionLanguageCollator(processor)(rows[start : start + 16])
        assert fast.keys() == stock.keys()
        for key in stock:
            torch.testing.assert_close(fast[key], stock[key], atol=1e-6, rtol=0, msg=key)


def test_batch_collator_leaves_qwen2_vl_batches_to_the_stock_collator():
    """Qwen2-VL's processor resizes and patchifies itself: its batches (with M-RoPE's inputs) are the stock ones."""
    import dataclasses

    from benchmarks.harness import VQABatchCollator, build_model
    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.data.vqa import build_vqa_dataset

    config = dataclasses.replace(DEMO_PRESETS["quick"], family="qwen2_vl").with_model(patch_size=8)
    _, processor = build_model(config)
    data = build_vqa_dataset(num_train=8, num_test=0, seed=3, image_size=64, cell_size=16)["train"]
    rows = [data[i] for i in range(len(data))]
    fast, stock = VQABatchCollator(processor)(rows), VisionLanguageCollator(processor)(rows)
    assert {"mm_token_type_ids", "image_grid_thw"} <= fast.keys() == stock.keys()
    for key in stock:
        torch.testing.assert_close(fast[key], stock[key], atol=0, rtol=0, msg=key)
    assert fast["image_grid_thw"].tolist() == [[1, 8, 8]] * 8  # 64 px at 8 px patches: 16 merged tokens


def test_committed_demo_results_match_the_default_preset():
    """benchmarks/results/demo.json, which benchmarks/README.md quotes, was measured with `make demo`'s preset."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo.json"
    saved = json.loads(path.read_text())
    assert DemoConfig.from_dict(saved["config"]) == DEMO_PRESETS["default"]
    runs = saved["runs"]
    assert runs["sparse"]["accuracy"] / runs["baseline"]["accuracy"] == pytest.approx(saved["accuracy_retained"])

"""The lmms-eval-style evaluator: tasks in the benchmarks' layouts, results files, compressed mode, bad input, cards.

The model is a tiny LLaVA whose LM head can only emit two answer tokens (e.g. "yes"/"no"): the answer then depends on
the image and the question through the whole network (so it is right on some samples and wrong on others, and
compression can change it), and every generation is exactly one of the two words with `max_new_tokens=1`.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import statistics
import string
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_sparse_mllm.data.vqa import build_vqa_dataset, vqa_vocabulary
from hf_sparse_mllm.evaluation import (
    Task,
    add_results_to_model_card,
    evaluate,
    evaluator,
    format_comparison_table,
    format_results_table,
    get_task,
    list_tasks,
    tasks,
)
from hf_sparse_mllm.evaluation import lmms_eval_plugin as plugin
from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

REPO = Path(__file__).resolve().parents[1]
EVAL_WORDS = [*vqa_vocabulary(), "b", "c", "answer", "question", "using", "single", "word", "or", "phrase", "with"]
TOP_LEVEL_KEYS = {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples"}


def two_answer_model(first: str = "yes", second: str = "no", seed: int = 0):
    """A tiny LLaVA whose greedy answer is `first` or `second`, decided by the sign of one projection of the last
    hidden state."""
    model, processor = build_tiny_llava_and_processor("test", words=EVAL_WORDS, seed=seed)
    ids = processor.tokenizer.convert_tokens_to_ids([first, second])
    assert processor.tokenizer.unk_token_id not in ids
    direction = torch.randn(model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids[0]] = direction
        model.lm_head.weight[ids[1]] = -direction
    return model.eval(), processor


@pytest.fixture(scope="module")
def yes_no():
    return two_answer_model()


def save_vqa(path, n: int = 24, seed: int = 0) -> str:
    from datasets import DatasetDict

    DatasetDict({"test": build_vqa_dataset(num_train=0, num_test=n, image_size=32, cell_size=8, seed=seed)["test"]})\
        .save_to_disk(str(path))  # fmt: skip
    return str(path)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()) for _ in range(n)
    ]


def _image_features(extra: dict):
    from datasets import Features, Image

    return Features({"image": Image(), **extra})


def read_jsonl(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def check_layout(results: dict, task: str, metrics: list[str], n: int) -> None:
    assert TOP_LEVEL_KEYS <= set(results) and {"config", "date"} <= set(results)
    entry = results["results"][task]
    assert entry["alias"] == task and entry["samples"] == n
    for metric in metrics:
        assert f"{metric},none" in entry and f"{metric}_stderr,none" in entry
    config = results["configs"][task]
    assert config["task"] == task and config["output_type"] == "generate_until"
    assert [m["metric"] for m in config["metric_list"]] == list(get_task(task).aggregation)
    assert "pre_prompt" in config["lmms_eval_specific_kwargs"]["default"]
    assert results["versions"][task] == 0.0 and results["n-shot"][task] == 0
    assert results["n-samples"][task] == {"original": n, "effective": n}
    assert set(results["higher_is_better"][task]) == set(get_task(task).aggregation)
    assert results["config"]["model_args"].startswith("pretrained=")


def hand_mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), statistics.stdev(values) / math.sqrt(len(values))


def _em(prediction: str, target: str) -> float:
    strip = str.maketrans("", "", string.punctuation)
    return float(prediction.strip().lower().translate(strip) == target.lower().translate(strip))


# ------------------------------------------------------------------------------------------------------ end to end


def test_sparse_vqa_end_to_end(tmp_path, yes_no):
    model, processor = yes_no
    task = get_task("sparse_vqa", dataset_path=save_vqa(tmp_path / "data"), max_new_tokens=1)
    out = tmp_path / "out"
    returned = evaluate(model, processor, [task], batch_size=5, output_dir=out, progress=False)

    results = json.loads((out / "results.json").read_text())
    assert "samples" not in results and returned["results"] == results["results"]
    families = sorted({r["doc"]["family"] for r in read_jsonl(out / "samples_sparse_vqa.jsonl")})
    check_layout(results, "sparse_vqa", ["exact_match", *[f"exact_match_{f}" for f in families]], 24)

    records = read_jsonl(out / "samples_sparse_vqa.jsonl")
    assert [r["doc_id"] for r in records] == list(range(24))
    assert all(r["filtered_resps"][0] in ("yes", "no") for r in records)
    # The image goes after the question, where the generated conversations have it.
    assert all(
        r["arguments"]["context"] == r["doc"]["question"] + "<image>" and r["arguments"]["num_images"] == 1
        for r in records
    )
    scores = [_em(r["filtered_resps"][0], r["target"]) for r in records]
    assert scores == [r["exact_match"] for r in records]
    accuracy, stderr = hand_mean_and_stderr(scores)
    assert 0 < accuracy < 1  # yes/no questions are right or wrong, the others always wrong
    assert results["results"]["sparse_vqa"]["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
    assert results["results"]["sparse_vqa"]["exact_match_stderr,none"] == pytest.approx(stderr, abs=1e-12)
    for family in families:
        values = [s for s, r in zip(scores, records) if r["doc"]["family"] == family]
        assert results["results"]["sparse_vqa"][f"exact_match_{family},none"] == pytest.approx(
            sum(values) / len(values)
        )
    assert results["config"]["mode"] == "full" and results["config"]["kept_visual_tokens_per_image"] == 16
    config = results["configs"]["sparse_vqa"]
    assert config["dataset_kwargs"] == {"load_from_disk": True} and config["dataset_path"] == task.dataset_path


def test_compressed_mode(tmp_path, yes_no):
    model, processor = yes_no
    task = get_task("sparse_vqa", dataset_path=save_vqa(tmp_path / "data"), max_new_tokens=1)
    full = evaluate(model, processor, [task], batch_size=8, progress=False)
    same = evaluate(
        model, processor, [task], batch_size=8, progress=False, token_compressor="divprune", keep_ratio=1.0
    )
    assert same["results"] == full["results"]
    assert [s["filtered_resps"] for s in same["samples"]["sparse_vqa"]] == [
        s["filtered_resps"] for s in full["samples"]["sparse_vqa"]
    ]
    sparse = evaluate(model, processor, [task], batch_size=8, progress=False, token_compressor="pool", num_keep=4)
    config = sparse["config"]
    assert config["mode"] == "compressed" and config["token_compressor"] == "pool"
    assert config["num_keep"] == 4 and config["kept_visual_tokens_per_image"] == 4
    assert config["model_args"].endswith("token_compressor=pool,num_keep=4")
    scores = [s["exact_match"] for s in sparse["samples"]["sparse_vqa"]]
    assert sparse["results"]["sparse_vqa"]["exact_match,none"] == pytest.approx(sum(scores) / len(scores))
    table = format_comparison_table({"full": full, "pool@4": sparse})
    assert "| sparse_vqa | exact_match |" in table and "pool@4 - full" in table


# ---------------------------------------------------------------------------------- built-in benchmark layouts


def _gqa(tmp_path):
    from datasets import Dataset, Value

    rows = {"image": _images(8), "question": [f"is the {c} object left ?" for c in "abcdabcd"]}
    rows["answer"] = ["yes", "no", "Yes", "no", "yes", "yes", "no", "no"]
    path = tmp_path / "gqa.parquet"
    Dataset.from_dict(rows, features=_image_features({"question": Value("string"), "answer": Value("string")}))\
        .to_parquet(str(path))  # fmt: skip
    return get_task("gqa", dataset_path=str(path), max_new_tokens=1)


def _hand_gqa(records):
    return {"exact_match": hand_mean_and_stderr([_em(r["filtered_resps"][0], r["doc"]["answer"]) for r in records])}


def _vqav2(tmp_path):
    image_paths = []
    for i, image in enumerate(_images(6, seed=1)):
        image_paths.append(str(tmp_path / f"{i}.png"))
        image.save(image_paths[-1])
    answer_sets = [
        ["yes"] * 10,
        ["no"] * 10,
        ["yes"] * 2 + ["no"] * 8,
        ["yes"] * 5 + ["no"] * 5,
        ["no"] * 3 + ["yes"] * 7,
    ]
    answer_sets.append(["yes"] * 3 + ["no"] * 7)
    path = tmp_path / "vqav2.jsonl"
    with open(path, "w") as handle:
        for i, (image, answers) in enumerate(zip(image_paths, answer_sets)):
            row = {"question_id": i, "image": image, "question": "is it red ?"}
            row["answers"] = [{"answer": a, "answer_id": j} for j, a in enumerate(answers)]
            handle.write(json.dumps(row) + "\n")
    return get_task("vqav2_val", dataset_path=str(path), max_new_tokens=1)


def _hand_vqav2(records):
    scores = []
    for r in records:
        answers = [a["answer"] for a in r["doc"]["answers"]]
        per_left_out = [
            min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == r["filtered_resps"][0]) / 3)
            for i in range(len(answers))
        ]
        scores.append(sum(per_left_out) / len(per_left_out))
    return {"exact_match": hand_mean_and_stderr(scores)}


def _pope(tmp_path):
    from datasets import Dataset, DatasetDict, Value

    rows = {"image": _images(10, seed=2), "question": ["is there a cat in the image ?"] * 10}
    rows |= {"answer": ["yes", "no"] * 5, "question_id": [str(i) for i in range(10)]}
    features = _image_features(
        {"question": Value("string"), "answer": Value("string"), "question_id": Value("string")}
    )
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "pope"))
    return get_task("pope", dataset_path=str(tmp_path / "pope"), max_new_tokens=1)


def _hand_pope(records):
    pairs = [(r["doc"]["answer"], r["filtered_resps"][0]) for r in records]
    tp = sum(t == "yes" and p == "yes" for t, p in pairs)
    fp = sum(t == "no" and p == "yes" for t, p in pairs)
    fn = sum(t == "yes" and p == "no" for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "pope_accuracy": (sum(t == p for t, p in pairs) / len(pairs), "N/A"),
        "pope_precision": (precision, "N/A"),
        "pope_recall": (recall, "N/A"),
        "pope_f1_score": (2 * precision * recall / (precision + recall) if precision + recall else 0.0, "N/A"),
        "pope_yes_ratio": (sum(t == "yes" for t, _ in pairs) / len(pairs), "N/A"),
    }


def _mme(tmp_path):
    from datasets import Dataset, Value

    categories = ["color", "color", "existence", "count", "code_reasoning", "code_reasoning"]
    rows = {"image": [], "question": [], "answer": [], "category": [], "question_id": []}
    for i, (category, image) in enumerate(zip(categories, _images(6, seed=3))):
        for answer in ("Yes", "No"):
            rows["image"].append(image)
            rows["question"].append(f"is this {answer.lower()} ? Please answer yes or no.")
            rows["answer"].append(answer)
            rows["category"].append(category)
            rows["question_id"].append(f"{category}/{i}.png")
    features = _image_features({k: Value("string") for k in ("question", "answer", "category", "question_id")})
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "mme"))
    return get_task("mme", dataset_path=str(tmp_path / "mme"), max_new_tokens=1)


def _hand_mme(records):
    perception = {"existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork"}
    by_category: dict = {}
    for r in records:
        right = float(r["filtered_resps"][0] == r["doc"]["answer"].lower())
        by_category.setdefault(r["doc"]["category"], {}).setdefault(r["doc"]["question_id"], []).append(right)
    scores = {
        c: sum(100 * sum(s) / 2 + 100 * (sum(s) == 2) for s in images.values()) / len(images)
        for c, images in by_category.items()
    }
    return {
        "mme_perception_score": (sum(v for c, v in scores.items() if c in perception), "N/A"),
        "mme_cognition_score": (sum(v for c, v in scores.items() if c not in perception), "N/A"),
    }


def _scienceqa(tmp_path):
    from datasets import Dataset, List, Value

    rows = {"image": _images(8, seed=4), "question": ["which is a magnet ?"] * 8, "hint": ["", "a hint"] * 4}
    rows |= {"choices": [["iron", "wood"]] * 8, "answer": [0, 1, 1, 0, 0, 1, 0, 1]}
    features = _image_features(
        {
            "question": Value("string"),
            "hint": Value("string"),
            "choices": List(Value("string")),
            "answer": Value("int64"),
        }
    )
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "sqa.parquet"))
    return get_task("scienceqa_img", dataset_path=str(tmp_path / "sqa.parquet"), max_new_tokens=1)


def _hand_scienceqa(records):
    # The model answers "a"/"b" (lower case): lmms-eval counts a bare letter ignoring case.
    return {
        "exact_match": hand_mean_and_stderr(
            [float(r["filtered_resps"][0] == "ab"[r["doc"]["answer"]]) for r in records]
        )
    }


LAYOUTS = {
    "gqa": (_gqa, _hand_gqa, ("yes", "no")),
    "vqav2_val": (_vqav2, _hand_vqav2, ("yes", "no")),
    "pope": (_pope, _hand_pope, ("yes", "no")),
    "mme": (_mme, _hand_mme, ("yes", "no")),
    "scienceqa_img": (_scienceqa, _hand_scienceqa, ("a", "b")),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_builtin_task_on_local_files(tmp_path, name):
    build, hand, answers = LAYOUTS[name]
    model, processor = two_answer_model(*answers, seed=1)
    task = build(tmp_path)
    results = evaluate(model, processor, [task], batch_size=4, output_dir=tmp_path / "out", progress=False)
    records = read_jsonl(tmp_path / "out" / f"samples_{name}.jsonl")
    check_layout(
        json.loads((tmp_path / "out" / "results.json").read_text()), name, list(task.aggregation), len(records)
    )
    assert {r["filtered_resps"][0] for r in records} <= set(answers)
    for metric, (value, stderr) in hand(records).items():
        assert results["results"][name][f"{metric},none"] == pytest.approx(value, abs=1e-9), metric
        reported = results["results"][name][f"{metric}_stderr,none"]
        assert reported == stderr if stderr == "N/A" else reported == pytest.approx(stderr, abs=1e-9)


def test_builtin_prompts_follow_lmms_eval():
    answer = "\nAnswer the question using a single word or phrase."
    assert get_task("gqa").prompt({"question": "Is it red?"}) == "Is it red?" + answer
    assert get_task("pope").prompt({"question": " Is there a dog? "}) == "Is there a dog?" + answer
    # MME's own instruction is replaced by the post prompt.
    assert get_task("mme").prompt({"question": "Is it red? Please answer yes or no."}) == "Is it red?" + answer
    assert get_task("mme", prompt_kwargs={"post_prompt": ""}).prompt(
        {"question": "Is it red? Please answer yes or no."}
    ) == "Is it red? Please answer yes or no."  # fmt: skip
    doc = {"hint": "Magnets attract.", "question": "Which is a magnet?", "choices": ["iron", "wood"], "answer": 1}
    assert get_task("scienceqa_img").prompt(doc) == (
        "Context: Magnets attract.\nWhich is a magnet?\nA. iron\nB. wood\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert get_task("scienceqa_img").doc_to_target(doc) == "B"
    assert get_task("sparse_vqa").prompt({"question": "what color is the circle ?"}) == "what color is the circle ?"
    assert list_tasks() == ["conversational", "gqa", "mme", "pope", "scienceqa_img", "sparse_vqa", "vqav2_val"]


# ------------------------------------------------------------------------------------------------------ bad input


def _no_results(path) -> bool:
    return not os.path.exists(path) or not any(Path(path).iterdir())


def test_wrong_columns(tmp_path, yes_no):
    model, processor = yes_no
    data = save_vqa(tmp_path / "data", n=4)
    with pytest.raises(ValueError, match=r"Task 'gqa' expects columns .*missing \['image'\]"):
        evaluate(model, processor, [get_task("gqa", dataset_path=data, split="test")], output_dir=tmp_path / "out")
    assert _no_results(tmp_path / "out")


def test_missing_dataset_path(tmp_path, yes_no):
    model, processor = yes_no
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(model, processor, [f"pope={tmp_path / 'nowhere'}"], output_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(model, processor, [get_task("gqa", dataset_path="./missing.parquet")], output_dir=tmp_path / "out")
    build_vqa_dataset(num_train=2, num_test=2, image_size=32, cell_size=8).save_to_disk(str(tmp_path / "two_splits"))
    task = get_task("sparse_vqa", dataset_path=str(tmp_path / "two_splits"), split="validation")
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
        evaluate(model, processor, [task], output_dir=tmp_path / "out")
    assert _no_results(tmp_path / "out")


def test_unknown_compressor(tmp_path, yes_no):
    model, processor = yes_no
    task = get_task("sparse_vqa", dataset_path=save_vqa(tmp_path / "data", n=4))
    with pytest.raises(ValueError, match="Unknown token compressor 'divprunee'"):
        evaluate(model, processor, [task], token_compressor="divprunee", keep_ratio=0.5, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        evaluate(model, processor, [task], token_compressor="divprune", keep_ratio=0.0, output_dir=tmp_path / "out")
    assert _no_results(tmp_path / "out")


def test_bad_values(tmp_path, yes_no):
    model, processor = yes_no
    mme = _mme(tmp_path)
    with pytest.raises(ValueError, match="exactly 2"):  # a limit that splits an image's question pair
        evaluate(model, processor, [mme], limit=3, output_dir=tmp_path / "out")
    from datasets import Dataset, DatasetDict, Value

    rows = {"image": _images(2), "question": ["q", "q"], "answer": ["yes", "maybe"], "question_id": ["0", "1"]}
    features = _image_features({k: Value("string") for k in ("question", "answer", "question_id")})
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "pope"))
    with pytest.raises(ValueError, match=r"Task 'pope'.*'maybe' in row 1"):
        evaluate(model, processor, [f"pope={tmp_path / 'pope'}"], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="Unknown task 'gqa2'"):
        get_task("gqa2")
    assert _no_results(tmp_path / "out")


def test_failure_after_generation_writes_nothing(tmp_path, yes_no):
    model, processor = yes_no
    data = save_vqa(tmp_path / "data", n=4)

    def broken(doc, prediction):
        raise RuntimeError("metric crashed")

    bad = get_task("sparse_vqa", dataset_path=data, name="broken", process_results=broken)
    good = get_task("sparse_vqa", dataset_path=data)
    with pytest.raises(RuntimeError, match="metric crashed"):
        evaluate(model, processor, [good, bad], output_dir=tmp_path / "out", max_new_tokens=1, progress=False)
    assert _no_results(tmp_path / "out")


# ------------------------------------------------------------------------------------- results, cards, script


def test_results_table_and_model_card(tmp_path, yes_no):
    model, processor = yes_no
    task = get_task("sparse_vqa", dataset_path=save_vqa(tmp_path / "data", n=8), max_new_tokens=1)
    full = evaluate(model, processor, [task], progress=False)
    sparse = evaluate(model, processor, [task], progress=False, token_compressor="divprune", keep_ratio=0.25)
    table = format_results_table(full)
    assert "| sparse_vqa | 0.0 | none | 0 | exact_match |" in table

    from huggingface_hub import ModelCard

    card_dir = tmp_path / "model"
    card_dir.mkdir()
    (card_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# My model\n\nSome text.\n")
    add_results_to_model_card(card_dir, [full, sparse], model_name="tiny")
    add_results_to_model_card(card_dir, full)  # re-adding replaces, never duplicates
    card = ModelCard.load(card_dir / "README.md")
    assert "Some text." in card.text and card.data.license == "apache-2.0"
    entries = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert len(entries) == len(card.data.eval_results)
    assert entries[("exact_match", None)] == round(full["results"]["sparse_vqa"]["exact_match,none"], 4)
    assert entries[("exact_match", "token_compressor=divprune,keep_ratio=0.25")] == round(
        sparse["results"]["sparse_vqa"]["exact_match,none"], 4
    )
    assert "model-index" in (card_dir / "README.md").read_text()

    # A sparse-trained folder without a card gets the package's card, with the recipe.
    from hf_sparse_mllm import SparseMLLMConfig

    sparse_dir = tmp_path / "sparse_model"
    SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25).save_pretrained(sparse_dir)
    add_results_to_model_card(sparse_dir, sparse)
    card = ModelCard.load(sparse_dir / "README.md")
    assert card.data.sparse_mllm["token_compressor"] == "divprune" and len(card.data.eval_results) == 6


# --------------------------------------------------------------------------------------------- lmms-eval plugin


def test_plugin_imports_without_lmms_eval():
    if plugin.LMMS_EVAL_AVAILABLE:
        pytest.skip("lmms-eval is installed here")
    with pytest.raises(ImportError, match="make install-lmms-eval"):
        plugin.SparseMLLMLmms(pretrained="unused")


def test_exported_task_yaml(tmp_path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    data = save_vqa(tmp_path / "data", n=4)
    with open(plugin.export_lmms_eval_task("sparse_vqa", tmp_path / "tasks", dataset_path=data)) as handle:
        config = yaml.load(handle, Loader=Loader)
    assert config["task"] == "sparse_vqa_local"
    assert config["dataset_path"] == data and config["dataset_kwargs"] == {"load_from_disk": True}
    module, function = config["process_results"][1].rsplit(".", 1)
    assert module == plugin.__name__ and callable(getattr(plugin, function))
    assert config["generation_kwargs"]["max_new_tokens"] == 8 and config["generation_kwargs"]["until"] == ["\n\n"]
    pope = yaml.load(open(plugin.export_lmms_eval_task("pope", tmp_path / "tasks", dataset_path=data)), Loader=Loader)
    assert pope["metric_list"][0]["aggregation"] == ("function", f"{plugin.__name__}.pope_aggregate_pope_accuracy")
    # The exported functions are the built-in task's.
    doc = {"answer": "yes", "question_id": "1"}
    assert plugin.pope_process_results(doc, [" Yes "]) == get_task("pope").process_results(doc, "Yes")
    with pytest.raises(FileNotFoundError):
        plugin.export_lmms_eval_task("pope", tmp_path / "tasks", dataset_path=tmp_path / "missing")


def test_plugin_entry_point_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]' in text
    assert 'sparse_mllm = "hf_sparse_mllm.evaluation.lmms_eval_plugin:lmms_eval_manifest"' in text


@pytest.mark.parametrize("module", [tasks, evaluator, plugin])
def test_docstring_examples(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_task_dataclass_checks():
    with pytest.raises(ValueError, match="at least one metric"):
        Task(name="x", doc_to_visual=list, doc_to_text=str, doc_to_target=str, process_results=dict, aggregation={})
    with pytest.raises(TypeError, match="Unknown Task fields"):
        get_task("gqa", max_tokens=3)


def test_evaluate_task_refuses_an_unknown_compression_argument_before_loading_anything():
    from hf_sparse_mllm.evaluation.evaluator import evaluate_task

    task = get_task("sparse_vqa", dataset_path="/nonexistent/never-loaded")
    with pytest.raises(TypeError, match="keep_ration"):
        evaluate_task(None, None, task, token_compressor="divprune", keep_ration=0.25)

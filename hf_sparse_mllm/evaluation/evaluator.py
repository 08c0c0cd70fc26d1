"""A small evaluator in lmms-eval's shape, with full or compressed visual tokens, writing lmms-eval's results layout.

[`evaluate`] runs [`~hf_sparse_mllm.evaluation.tasks.Task`]s on a model: prompts from `doc_to_text`/`doc_to_visual`,
batched greedy generation (left padding, longest prompts first, as lmms-eval's models batch), the task's per-sample
metric and its aggregation. The returned dict has lmms-eval's keys (`results[task]["<metric>,none"]`,
`"<metric>_stderr,none"`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`, `config` with the
model args, `date`, and `samples` per task); [`write_results`] writes `results.json` and one
`samples_<task>.jsonl` per task, each file atomically and `results.json` last.

Evaluating the same model twice, with `token_compressor=None` and with a compressor, measures the
training-inference mismatch of a sparse recipe (and what sparse inference would cost in accuracy).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .generation import (
    generate_from_prompts,
    length_sort_key,
    render_prompt,
    resolve_compression,
)
from .tasks import Task, get_task

RESULTS_FILE = "results.json"

# `model-index` dataset ids and display names of the built-in tasks.
CARD_DATASETS = {
    "gqa": ("lmms-lab/GQA", "GQA (testdev balanced)"),
    "vqav2_val": ("lmms-lab/VQAv2", "VQAv2 (val)"),
    "pope": ("lmms-lab/POPE", "POPE"),
    "mme": ("lmms-lab/MME", "MME"),
    "scienceqa_img": ("lmms-lab/ScienceQA", "ScienceQA-IMG"),
    "sparse_vqa": ("sparse_vqa", "Generated CLEVR-like VQA (hf_sparse_mllm.data.vqa)"),
}


def load_for_evaluation(pretrained: str, *, device: str | None = "auto", dtype: str = "auto"):
    """Load a saved model folder (or Hub id) and its processor for evaluation, in eval mode.

    Args:
        pretrained (`str`):
            A folder written by `save_pretrained` (weights, `config.json` and the processor files) or a Hub id.
        device (`str`, *optional*, defaults to `"auto"`):
            `"auto"` picks CUDA when available, else CPU.
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"` keeps the checkpoint's dtype; or `"float32"`, `"bfloat16"`, `"float16"`.

    Returns:
        `tuple[PreTrainedModel, ProcessorMixin]`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pretrained = os.fspath(pretrained)
    if not os.path.isdir(pretrained) and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1):
        raise FileNotFoundError(f"Model folder {pretrained!r} does not exist.")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}.")
    model = AutoModelForImageTextToText.from_pretrained(
        pretrained, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
    )
    processor = AutoProcessor.from_pretrained(pretrained)
    return model.to(device).eval(), processor


def _as_task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        name, _, path = task.partition("=")
        return get_task(name, dataset_path=path or None)
    raise TypeError(f"Expected a Task or a task name, got {type(task).__name__}.")


def task_for_model(task: Task, model) -> Task:
    """`task`, with `sparse_vqa`'s generated test scenes (used when it has no dataset_path) drawn at the model's
    geometry: its image size, one vision patch per grid cell, as the training scenes were."""
    from . import tasks as tasks_module

    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if task.dataset_path is not None or task.default_docs is not tasks_module.sparse_vqa_test_docs or vision is None:
        return task
    geometry = {"image_size": vision.image_size, "cell_size": vision.patch_size}
    return dataclasses.replace(task, default_docs=functools.partial(tasks_module.sparse_vqa_test_docs, **geometry))


def _json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of a sample value (images dropped, numpy scalars converted)."""
    if isinstance(value, Mapping):
        if set(value) <= {"bytes", "path"} and "bytes" in value:
            return {"path": value.get("path")}  # an encoded image
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return f"<{type(value).__name__}>"


def _image_columns(docs) -> list[str]:
    from datasets import Image, List, Sequence

    columns = []
    for name, feature in docs.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, Image) or (isinstance(feature, (List, Sequence)) and isinstance(inner, Image)):
            columns.append(name)
    return columns


def _model_args_string(model, token_compressor, keep_ratio, num_keep) -> str:
    args = {"pretrained": getattr(model, "name_or_path", "") or type(model).__name__}
    if token_compressor is not None:
        args["token_compressor"] = getattr(token_compressor, "name", token_compressor)
        if num_keep is not None:
            args["num_keep"] = num_keep
        else:
            args["keep_ratio"] = keep_ratio
    return ",".join(f"{key}={value}" for key, value in args.items())


def evaluate_task(
    model,
    processor,
    task: Task,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    docs=None,
    n_original: int | None = None,
    stats: dict | None = None,
    **compression,
) -> dict[str, Any]:
    """Run one task; return `{"metrics", "samples", "n_docs", "n_original", "seconds"}` (see [`evaluate`]).

    `compression` is `token_compressor`, `keep_ratio` and `num_keep`, as for [`generate_from_prompts`]. `docs` (the
    task's loaded samples) and `n_original` skip loading them again when the caller already has them; `stats`
    accumulates the visual tokens seen (see [`generate_from_prompts`]).
    """
    unknown = set(compression) - {"token_compressor", "keep_ratio", "num_keep"}
    if unknown:
        raise TypeError(f"evaluate_task got unexpected keyword arguments {sorted(unknown)}.")
    start = time.perf_counter()
    if docs is None:
        docs, n_original = task.load_with_size(limit)
    n_original = len(docs) if n_original is None else n_original
    text_docs = docs.remove_columns(_image_columns(docs))
    tokenizer = getattr(processor, "tokenizer", processor)
    contexts = [task.prompt(doc) for doc in text_docs]
    order = sorted(range(len(docs)), key=lambda i: length_sort_key(tokenizer, contexts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=task.name, unit="batch")
    raw: list[str | None] = [None] * len(docs)
    prompts: list[str | None] = [None] * len(docs)
    num_images: list[int] = [0] * len(docs)
    for batch in batches:
        visuals = [task.visuals(docs[i]) for i in batch]
        for i, images in zip(batch, visuals):
            num_images[i] = len(images)
            prompts[i] = render_prompt(processor, task.messages(text_docs[i], len(images)))
        outputs = generate_from_prompts(
            model,
            processor,
            [prompts[i] for i in batch],
            visuals,
            max_new_tokens=max_new_tokens or task.max_new_tokens,
            stats=stats,
            **compression,
        )
        for i, output in zip(batch, outputs):
            raw[i] = output

    values: dict[str, list] = {}
    samples = []
    for i, doc in enumerate(text_docs):
        prediction = task.postprocess(raw[i])
        scores = task.process_results(doc, prediction)
        for metric, value in scores.items():
            values.setdefault(metric, []).append(value)
        samples.append(
            {
                "doc_id": i,
                "doc": _json_safe(doc),
                "target": _json_safe(task.doc_to_target(doc)),
                "arguments": {"context": contexts[i], "prompt": prompts[i], "num_images": num_images[i]},
                "resps": [[raw[i]]],
                "filtered_resps": [prediction],
                **{metric: _json_safe(value) for metric, value in scores.items()},
            }
        )
    return {
        "metrics": task.aggregate(values),
        "samples": samples,
        "n_docs": len(docs),
        "n_original": n_original,
        "seconds": time.perf_counter() - start,
    }


def evaluate(
    model,
    processor,
    tasks: Sequence[Task | str],
    *,
    batch_size: int = 32,
    token_compressor=None,
    keep_ratio: float | None = None,
    num_keep: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
    model_name: str = "sparse_mllm",
    model_args: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Evaluate `model` on `tasks` with greedy generation and return the results in lmms-eval's layout.

    Every task's dataset is loaded and checked (columns, answer values) before anything is generated, so a bad task
    fails fast; results files are written only once every task has finished.

    Args:
        model (`PreTrainedModel`):
            The (unwrapped) vision-language model, e.g. loaded with `AutoModelForImageTextToText.from_pretrained`.
        processor (`ProcessorMixin`):
            Its processor, with a chat template.
        tasks (`Sequence[Task | str]`):
            [`~hf_sparse_mllm.evaluation.tasks.Task`]s, registered task names, or `"name=dataset_path"` strings.
        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per `generate` call.
        token_compressor (`str`, *optional*):
            A registered compressor (e.g. `"divprune"`) for compressed-token inference; `None` keeps every token.
        keep_ratio (`float`, *optional*):
            Fraction of visual tokens kept per image with `token_compressor`.
        num_keep (`int`, *optional*):
            Visual tokens kept per image with `token_compressor` (overrides `keep_ratio`).
        max_new_tokens (`int`, *optional*):
            Overrides every task's generation limit.
        limit (`int`, *optional*):
            Evaluate only the first `limit` samples of each task (for smoke tests).
        output_dir (`str`, *optional*):
            Where to write `results.json` and `samples_<task>.jsonl` (see [`write_results`]).
        model_name (`str`, *optional*, defaults to `"sparse_mllm"`):
            Reported as `config.model`.
        model_args (`str`, *optional*):
            Reported as `config.model_args`; defaults to `pretrained=<name_or_path>` plus the compression arguments.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.

    Returns:
        `dict`: `results`, `group_subtasks`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`,
        `config`, `date`, `throughput` and `samples` (per task, the per-sample records also written as JSONL).

    Example:

    ```python
    >>> from hf_sparse_mllm.data.vqa import build_vqa_dataset, vqa_vocabulary
    >>> from hf_sparse_mllm.evaluation import evaluate, get_task
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> model, processor = build_tiny_llava_and_processor("test", words=vqa_vocabulary())
    >>> import tempfile
    >>> data = tempfile.mkdtemp()
    >>> build_vqa_dataset(num_train=0, num_test=8, image_size=32, cell_size=8)["test"].save_to_disk(data)
    >>> task = get_task("sparse_vqa", dataset_path=data)
    >>> full = evaluate(model, processor, [task], progress=False)
    >>> sparse = evaluate(model, processor, [task], token_compressor="divprune", keep_ratio=0.5, progress=False)
    >>> sorted(full["results"]["sparse_vqa"])[:3]
    ['alias', 'exact_match,none', 'exact_match_color,none']
    >>> sparse["config"]["model_args"].endswith("token_compressor=divprune,keep_ratio=0.5")
    True

    ```
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}.")
    compression = resolve_compression(model, token_compressor, keep_ratio, num_keep)
    compressor = None if compression is None else compression.compressor
    tasks = [task_for_model(_as_task(task), model) for task in tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique in one evaluation, got {names}.")
    # Fail on a bad path, layout or answer before generating anything.
    loaded = {task.name: task.load_with_size(limit) for task in tasks}

    was_training = model.training
    model.eval()
    outputs = {}
    stats: dict = {}  # visual tokens seen, for the results' config
    try:
        for task in tasks:
            outputs[task.name] = evaluate_task(
                model,
                processor,
                task,
                batch_size=batch_size,
                token_compressor=compressor,
                keep_ratio=keep_ratio,
                num_keep=num_keep,
                max_new_tokens=max_new_tokens,
                limit=limit,
                progress=progress,
                docs=loaded[task.name][0],
                n_original=loaded[task.name][1],
                stats=stats,
            )
    finally:
        model.train(was_training)

    from .._version import __version__

    configs = {}
    for task in tasks:
        config = task.to_config()
        if max_new_tokens:
            config["generation_kwargs"]["max_new_tokens"] = max_new_tokens
        configs[task.name] = config
    images = stats.get("images", 0)
    tokens_per_image = round(stats["visual_tokens"] / images, 2) if images else None
    kept_per_image = round(stats["kept_visual_tokens"] / images, 2) if images else None
    results = {
        "results": {
            task.name: {"alias": task.name, **outputs[task.name]["metrics"], "samples": outputs[task.name]["n_docs"]}
            for task in tasks
        },
        "group_subtasks": {task.name: [] for task in tasks},
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted((task.name, task.version) for task in tasks)),
        "n-shot": dict(sorted((task.name, 0) for task in tasks)),
        "higher_is_better": dict(sorted((task.name, dict(task.higher_is_better)) for task in tasks)),
        "n-samples": {
            task.name: {"original": outputs[task.name]["n_original"], "effective": outputs[task.name]["n_docs"]}
            for task in tasks
        },
        "config": {
            "model": model_name,
            "model_args": model_args or _model_args_string(model, compressor, keep_ratio, num_keep),
            "batch_size": batch_size,
            "device": str(next(model.parameters()).device),
            "limit": limit,
            "gen_kwargs": {"max_new_tokens": max_new_tokens} if max_new_tokens else None,
            "mode": "full" if compressor is None else "compressed",
            "token_compressor": None if compressor is None else compressor.name,
            "keep_ratio": keep_ratio if compressor is not None and num_keep is None else None,
            "num_keep": num_keep if compressor is not None else None,
            "visual_tokens_per_image": tokens_per_image,
            "kept_visual_tokens_per_image": kept_per_image,
            "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        "hf_sparse_mllm_version": __version__,
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now().strftime("%Y%m%d_%H%M%S"),
        "throughput": {
            task.name: {
                "seconds": round(outputs[task.name]["seconds"], 3),
                "samples_per_second": round(
                    outputs[task.name]["n_docs"] / max(outputs[task.name]["seconds"], 1e-9), 3
                ),
            }
            for task in tasks
        },
        "samples": {task.name: outputs[task.name]["samples"] for task in tasks},
    }
    if output_dir is not None:
        write_results(results, output_dir)
    return results


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_results(results: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write `samples_<task>.jsonl` per task, then `results.json` (without the samples), each atomically.

    Returns:
        `dict[str, str]`: file kind (`"results"` or the task name) to path.
    """
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for task, records in results.get("samples", {}).items():
        path = os.path.join(output_dir, f"samples_{task}.jsonl")
        _atomic_write(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        paths[task] = path
    body = {key: value for key, value in results.items() if key != "samples"}
    path = os.path.join(output_dir, RESULTS_FILE)
    _atomic_write(path, json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n")
    paths["results"] = path
    return paths


def metric_values(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from a results dict (stderr entries and non-metric keys left out)."""
    out = {}
    for task, entries in results["results"].items():
        out[task] = {
            key.split(",")[0]: value
            for key, value in entries.items()
            if "," in key and "_stderr" not in key.split(",")[0]
        }
    return out


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_results_table(results: dict) -> str:
    """A Markdown table of a results dict, with lmms-eval's columns (Tasks, Version, Filter, n-shot, Metric, ...)."""
    lines = ["| Tasks | Version | Filter | n-shot | Metric | Value | Stderr |", "|---|---|---|---|---|---:|---:|"]
    for task, values in metric_values(results).items():
        for metric, value in values.items():
            stderr = results["results"][task].get(f"{metric}_stderr,none", "N/A")
            lines.append(
                f"| {task} | {results['versions'].get(task, '')} | none | 0 | {metric} | {_fmt(value)} | "
                f"{'± ' + _fmt(stderr) if isinstance(stderr, float) else stderr} |"
            )
    return "\n".join(lines)


def format_comparison_table(runs: Mapping[str, dict]) -> str:
    """A Markdown table with one value column per run (e.g. `{"full": ..., "divprune@0.25": ...}`) and the change of
    every run against the first."""
    labels = list(runs)
    values = {label: metric_values(results) for label, results in runs.items()}
    header = ["Task", "Metric", *labels, *[f"{label} - {labels[0]}" for label in labels[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    first = values[labels[0]]
    for task, metrics in first.items():
        for metric, base in metrics.items():
            row = [task, metric]
            others = [values[label].get(task, {}).get(metric) for label in labels]
            row += [_fmt(v) if v is not None else "-" for v in others]
            for other in others[1:]:
                delta = other - base if isinstance(other, (int, float)) and isinstance(base, (int, float)) else None
                row.append(f"{delta:+.4f}" if delta is not None else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_to_eval_results(results: dict, *, source_name: str | None = None, source_url: str | None = None) -> list:
    """`huggingface_hub.EvalResult`s (one per task and metric) for a model card's `model-index`.

    Compressed-token runs carry their setting in `metric_config` (e.g. `token_compressor=divprune,keep_ratio=0.25`)
    so that they sit next to, and never replace, the full-token numbers.
    """
    from huggingface_hub import EvalResult

    config = results.get("config", {})
    metric_config = None
    if config.get("token_compressor"):
        budget = f"num_keep={config['num_keep']}" if config.get("num_keep") else f"keep_ratio={config['keep_ratio']}"
        metric_config = f"token_compressor={config['token_compressor']},{budget}"
    out = []
    for task, metrics in metric_values(results).items():
        task_config = results.get("configs", {}).get(task, {})
        dataset_type, dataset_name = CARD_DATASETS.get(task, (task, task))
        for metric, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            out.append(
                EvalResult(
                    task_type="visual-question-answering",
                    task_name="Visual Question Answering",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=task_config.get("test_split"),
                    metric_type=metric,
                    metric_name=metric if metric_config is None else f"{metric} ({metric_config})",
                    metric_value=round(float(value), 4),
                    metric_config=metric_config,
                    # `EvalResult` accepts a source name only together with its URL.
                    source_name=(source_name or "hf_sparse_mllm evaluation (lmms-eval rules)") if source_url else None,
                    source_url=source_url,
                )
            )
    return out


def add_results_to_model_card(model_dir: str | os.PathLike, results: dict | Sequence[dict], model_name=None) -> str:
    """Add evaluation results to `model_dir/README.md` as `model-index` entries, replacing entries of the same task,
    dataset, split, metric and compression setting; other entries and the card text are kept.

    Args:
        model_dir (`str`):
            The saved model folder. Without a README.md, a card is created: the package's card
            ([`~hf_sparse_mllm.hub.render_model_card`]) when the folder holds a sparse recipe, else a minimal one.
        results (`dict` or `list[dict]`):
            One or more results dicts from [`evaluate`].
        model_name (`str`, *optional*):
            The `model_name` of the card data, needed by `model-index`; defaults to the existing one or the folder name.

    Returns:
        `str`: the card's path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..config import SPARSE_CONFIG_NAME

    path = os.path.join(os.fspath(model_dir), "README.md")
    name = model_name or os.path.basename(os.path.abspath(model_dir))
    if os.path.exists(path):
        card = ModelCard.load(path)
    elif os.path.exists(os.path.join(os.fspath(model_dir), SPARSE_CONFIG_NAME)):
        # A sparse-trained folder without a card gets the package's card (recipe in words and metadata).
        from ..config import SparseMLLMConfig
        from ..hub import render_model_card

        card = render_model_card(SparseMLLMConfig.from_pretrained(model_dir), model_name=name)
    else:
        card = ModelCard(f"---\n{ModelCardData(model_name=name).to_yaml()}\n---\n\n# {name}\n")
    data = card.data
    data.model_name = model_name or getattr(data, "model_name", None) or os.path.basename(os.path.abspath(model_dir))
    new = []
    for result in [results] if isinstance(results, dict) else list(results):
        new += results_to_eval_results(result)

    def key(r):
        return (r.task_type, r.dataset_type, r.dataset_split, r.metric_type, r.metric_config)

    replaced = {key(r) for r in new}
    data.eval_results = [r for r in (data.eval_results or []) if key(r) not in replaced] + new
    card.save(path)
    return path


__all__ = [
    "RESULTS_FILE",
    "add_results_to_model_card",
    "evaluate",
    "evaluate_task",
    "format_comparison_table",
    "format_results_table",
    "load_for_evaluation",
    "metric_values",
    "results_to_eval_results",
    "task_for_model",
    "write_results",
]

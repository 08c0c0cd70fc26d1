"""The end-to-end demo and accuracy benchmark: the same tiny LLaVA trained with the stock `Trainer` and with
`SparseMLLMTrainer` on the generated VQA data, both evaluated with all visual tokens.

`scripts/demo.py` (`make demo`) and `scripts/bench_accuracy.py` (`make bench-accuracy`) are thin command lines over
[`run_demo`] and [`train_and_evaluate`]. Everything is built offline: the data is generated (and cached), the model is
built from a config, the tokenizer is a word-level one.

```python
>>> from hf_sparse_mllm.demo import DemoConfig, DEMO_PRESETS
>>> DEMO_PRESETS["default"].num_visual_tokens
64

```
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .config import SparseMLLMConfig
from .data.collator import VisionLanguageCollator
from .data.vqa import FAMILIES, blind_baseline, build_vqa_dataset, load_vqa_dataset, save_vqa_dataset, vqa_vocabulary
from .tiny import TinyLlavaPreset, build_tiny_llava_and_processor
from .trainer import SparseMLLMTrainer

logger = logging.getLogger(__name__)

# Families whose accuracy the learnability target (>= 90 % exact match) is about; count and relation are harder.
TARGET_FAMILIES = ("color", "shape", "exist")


@dataclass
class DemoConfig:
    """Everything that defines one demo run: data, model shape, optimisation and the sparse recipe.

    Args:
        image_size (`int`, *optional*, defaults to `128`): canvas side in pixels (also the vision tower's input).
        patch_size (`int`, *optional*, defaults to `16`): vision patch side; `(image_size // patch_size) ** 2` tokens.
        cell_size (`int`, *optional*, defaults to `16`): scene grid cell; objects fill one cell, aligned to patches.
        max_objects (`int`, *optional*, defaults to `5`): most objects per scene.
        families (`tuple[str, ...]`, *optional*): question families (default all five, equally weighted).
        border (`int`, *optional*, defaults to `1`): black border width around each shape (`0`: plain fills).
        image_first (`bool`, *optional*, defaults to `False`): image before the question (see
            [`~hf_sparse_mllm.data.vqa.build_vqa_dataset`] for why the default is after).
        train_samples (`int`, *optional*, defaults to `20000`): generated training question-answer pairs.
        test_samples (`int`, *optional*, defaults to `1000`): generated test pairs (the final evaluation).
        curve_samples (`int`, *optional*, defaults to `250`): test pairs evaluated at each curve checkpoint.
        curve_points (`int`, *optional*, defaults to `8`): checkpoints of the accuracy-vs-time curve.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vision_hidden_size, vision_layers:
            the tiny LLaVA's shape (see [`~hf_sparse_mllm.tiny.TinyLlavaPreset`]). The default is a 1 x 32 vision
            tower and a 2 x 128 decoder: objects fill whole patches, so one narrow tower layer recognises them, and a
            cheap tower leaves most of the step to the language model, which is what token compression speeds up.
        learning_rate (`float`, *optional*, defaults to `3e-4`): AdamW peak learning rate (see the README's
            section "Learnability: what was tried").
        warmup_steps (`int`, *optional*, defaults to `100`): linear warm-up, then cosine decay.
        batch_size (`int`, *optional*, defaults to `32`): samples per optimizer step.
        max_steps (`int`, *optional*, defaults to `2000`): optimizer steps of each run.
        logging_steps (`int`, *optional*, defaults to `50`): loss logging interval.
        seed (`int`, *optional*, defaults to `0`): seed of the weights, the data order and the data.
        threads (`int`, *optional*, defaults to `1`): `torch.set_num_threads`. One thread by default: with more, every
            small operation waits at a thread barrier whenever another process holds a core (see README, Performance).
        dataloader_workers (`int`, *optional*, defaults to `1`): `dataloader_num_workers`. One worker decodes the PNGs
            and collates the next batch on the second core while the step runs (tens of milliseconds per step otherwise).
        token_compressor, keep_ratio, slow_mode_prob, num_isolator_tokens: the sparse run's recipe.
    """

    image_size: int = 128
    patch_size: int = 16
    cell_size: int = 16
    max_objects: int = 5
    families: tuple[str, ...] | None = None
    border: int = 1
    image_first: bool = False
    train_samples: int = 20_000
    test_samples: int = 1_000
    curve_samples: int = 250
    curve_points: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 1
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    batch_size: int = 32
    max_steps: int = 2000
    logging_steps: int = 50
    seed: int = 0
    threads: int = 1
    dataloader_workers: int = 1
    token_compressor: str | None = "divprune"
    keep_ratio: float = 0.25
    slow_mode_prob: float = 0.1
    num_isolator_tokens: int = 4
    eval_batch_size: int = 100

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def sparse_config(self, **overrides) -> SparseMLLMConfig:
        recipe = dict(
            token_compressor=self.token_compressor,
            keep_ratio=self.keep_ratio,
            slow_mode_prob=self.slow_mode_prob,
            num_isolator_tokens=self.num_isolator_tokens,
            stage="instruction",
            seed=self.seed,
        )
        recipe.update(overrides)
        return SparseMLLMConfig(**recipe)


DEMO_PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    # The accuracy benchmark (`make bench-accuracy`): 144 visual tokens, at most 5 of them objects, so the language
    # model's share of a step is large enough for compression to show its speed-up.
    "bench": DemoConfig(image_size=192, max_steps=3000),
    # The combined recipe (token compression + DualSpeed + layer skipping): a 4-layer decoder, so that with the first
    # and last layer protected there are layers to skip; deeper, the decoder's share of a step grows too.
    "bench-deep": DemoConfig(image_size=192, num_hidden_layers=4, max_steps=2000),
    # The combined recipe with 8 decoder layers: the language model dominates the step (the baseline takes more than
    # twice as long as with 4), and skipping a layer is an eighth of the depth, not a quarter.
    "bench-deep8": DemoConfig(image_size=192, num_hidden_layers=8, max_steps=2000),
    # A smoke run (tests, `--quick`): 16 visual tokens, a few steps, seconds.
    "quick": DemoConfig(
        image_size=64,
        patch_size=16,
        cell_size=16,
        train_samples=64,
        test_samples=24,
        curve_samples=8,
        curve_points=2,
        hidden_size=32,
        intermediate_size=64,
        vision_hidden_size=16,
        vision_layers=1,
        batch_size=8,
        max_steps=3,
        dataloader_workers=0,
        warmup_steps=1,
        logging_steps=1,
        eval_batch_size=16,
    ),
}


# ---- data and model ------------------------------------------------------------------------------------------------


def prepare_data(config: DemoConfig, cache_dir: str | os.PathLike | None = "outputs/data", progress: bool = False):
    """Generate the VQA dataset for `config` (or load it from `cache_dir`, where it is saved after generation)."""
    name = (
        f"vqa-{config.image_size}px-cell{config.cell_size}-train{config.train_samples}-test{config.test_samples}"
        f"-seed{config.seed}-obj{config.max_objects}-border{config.border}{'-imagefirst' if config.image_first else ''}"
        + ("-" + "-".join(config.families) if config.families else "")
    )
    path = Path(cache_dir) / name if cache_dir is not None else None
    if path is not None and (path / "dataset_dict.json").is_file():
        logger.info("Loading the cached dataset from %s", path)
        return load_vqa_dataset(str(path))
    dataset = build_vqa_dataset(
        num_train=config.train_samples,
        num_test=config.test_samples,
        seed=config.seed,
        image_size=config.image_size,
        cell_size=config.cell_size,
        families=config.families,
        max_objects=config.max_objects,
        border=config.border,
        image_first=config.image_first,
        progress=progress,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a concurrent run never memory-maps a half-written (or rewritten) cache.
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        save_vqa_dataset(dataset, str(partial))
        try:
            os.rename(partial, path)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(partial, ignore_errors=True)
        dataset = load_vqa_dataset(str(path))  # memory-mapped, as every later run reads it
    return dataset


def build_model(config: DemoConfig):
    """The tiny LLaVA and its processor for `config` (weights seeded by `config.seed`)."""
    preset = TinyLlavaPreset(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        vision_hidden_size=config.vision_hidden_size,
        vision_layers=config.vision_layers,
    )
    return build_tiny_llava_and_processor(preset, words=vqa_vocabulary(), seed=config.seed)


class FastVisionLanguageCollator:
    """A fast path of [`~hf_sparse_mllm.data.collator.VisionLanguageCollator`] for the demo's data: same batches.

    On 2 CPU cores the stock collation (TRL's chat-template rendering with assistant masks, the PIL image processor)
    takes a third of a tiny model's training step, and it runs in the same process as the step. For samples with one
    image that already has the processor's size (the generated data), this collator renders the same chat template,
    expands `<image>` to its placeholders, tokenises the batch at once, masks everything but the answer and its
    `</s>`, and normalises the stacked pixels with the processor's mean and std; `tests/test_demo.py` checks that the
    batches equal the stock collator's. Other samples go to the stock collator. Both demo runs use it, so the
    comparison is unchanged; it only keeps data preparation from hiding the training speed-up.
    """

    def __init__(self, processor):
        self.processor = processor
        self.stock = VisionLanguageCollator(processor)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.size = (image_processor.crop_size["height"], image_processor.crop_size["width"])
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        patches = (self.size[0] // processor.patch_size) * (self.size[1] // processor.patch_size)
        self.image_text = processor.image_token * (patches + processor.num_additional_image_tokens)
        if processor.vision_feature_select_strategy == "default":
            self.image_text = processor.image_token * patches
        self.answer_marker = self.tokenizer.convert_tokens_to_ids(["assistant", ":"])

    def _fast_ok(self, examples) -> bool:
        if self.tokenizer.padding_side != "right":
            return False
        for example in examples:
            images = example.get("images") or []
            if len(images) != 1 or getattr(images[0], "size", None) != self.size[::-1]:
                return False
            if [m["role"] for m in example["messages"]] != ["user", "assistant"]:
                return False
        return True

    def __call__(self, examples):
        if not self._fast_ok(examples):
            return self.stock(examples)
        texts = [
            self.processor.apply_chat_template(e["messages"], tokenize=False).replace(
                self.processor.image_token, self.image_text
            )
            for e in examples
        ]
        encoded = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        labels = torch.full_like(input_ids, -100)
        for row, ids in enumerate(input_ids.tolist()):
            length = int(attention_mask[row].sum())
            # The answer is everything after the last "assistant :" (the template's generation block).
            start = max(i for i in range(length - 1) if ids[i : i + 2] == self.answer_marker) + 2
            labels[row, start:length] = input_ids[row, start:length]
        pixels = np.stack([np.asarray(e["images"][0].convert("RGB")) for e in examples])
        pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
        pixel_values = (pixel_values - self.mean) / self.std
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
        }


# ---- evaluation ----------------------------------------------------------------------------------------------------


def exact_match_accuracy(predictions, samples) -> dict[str, float]:
    """Exact match (`prediction.strip().lower() == answer`) overall and per question family."""
    hits = defaultdict(list)
    for prediction, answer, family in zip(predictions, samples["answer"], samples["family"]):
        hits[family].append(prediction.strip().lower() == answer)
    total = [h for values in hits.values() for h in values]
    result = {"overall": sum(total) / max(len(total), 1)}
    result.update({family: sum(hits[f]) / len(hits[f]) for f in FAMILIES for family in [f] if hits[f]})
    return result


def evaluate_vqa(
    model,
    processor,
    samples,
    *,
    batch_size: int = 100,
    token_compressor: str | None = None,
    keep_ratio: float | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Greedy-decode answers with all visual tokens (or compressed ones) and score them by exact match."""
    from .evaluation import generate_answers

    was_training = model.training
    model.eval()
    predictions = generate_answers(
        model,
        processor,
        samples,
        batch_size=batch_size,
        max_new_tokens=3,
        token_compressor=token_compressor,
        keep_ratio=keep_ratio if token_compressor is not None else None,
        progress=progress,
    )
    model.train(was_training)
    return exact_match_accuracy(predictions, samples)


class AccuracyCurveCallback(TrainerCallback):
    """Evaluate a small test subset at a few steps and measure the training time without those evaluations.

    `train_seconds` is the wall-clock time from `on_train_begin` to `on_train_end` minus the time spent here
    evaluating; `train_cpu_seconds` is the same for this process's CPU time, which other processes on a shared
    machine disturb far less than the wall clock (with one torch thread it is the compute the run needed); `curve`
    is a list of `(step, train_seconds_so_far, accuracy)` points.
    """

    def __init__(self, processor, samples, eval_steps: list[int], batch_size: int = 100):
        self.processor = processor
        self.samples = samples
        self.eval_steps = set(eval_steps)
        self.batch_size = batch_size
        self.curve: list[dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.eval_cpu_seconds = 0.0
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self._start = 0.0
        self._cpu_start = 0.0

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start - self.eval_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.eval_steps or model is None or not self.samples:
            return
        elapsed = self._elapsed()
        start, cpu_start = time.perf_counter(), time.process_time()
        accuracy = evaluate_vqa(model, self.processor, self.samples, batch_size=self.batch_size, progress=False)
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        self.curve.append({"step": state.global_step, "train_seconds": elapsed, "accuracy": accuracy})

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = self._elapsed()
        self.train_cpu_seconds = time.process_time() - self._cpu_start - self.eval_cpu_seconds


def time_to_accuracy(baseline_curve: list[dict], sparse_curve: list[dict]) -> dict[str, Any] | None:
    """How soon each run first reached the baseline's final accuracy on the curve subset, in training seconds.

    Returns `None` without curves or when that accuracy is 0 (nothing to reach); otherwise `target` (the baseline's
    last curve accuracy), `baseline_seconds` (the baseline's first curve point at or above it, which may come before
    its last), `sparse_seconds` and `sparse_step` (the sparse run's first such point, `None` if none) and `speedup`
    (`baseline_seconds / sparse_seconds`, `None` if the sparse run never reached the target).

    ```python
    >>> base = [{"step": 10, "train_seconds": 10.0, "accuracy": {"overall": 0.5}},
    ...         {"step": 20, "train_seconds": 20.0, "accuracy": {"overall": 0.8}}]
    >>> fast = [{"step": 10, "train_seconds": 4.0, "accuracy": {"overall": 0.8}},
    ...         {"step": 20, "train_seconds": 8.0, "accuracy": {"overall": 0.9}}]
    >>> time_to_accuracy(base, fast)["speedup"]
    5.0

    ```
    """
    if not baseline_curve or not sparse_curve or baseline_curve[-1]["accuracy"]["overall"] <= 0:
        return None
    target = baseline_curve[-1]["accuracy"]["overall"]

    def first_at_target(curve):
        return next((p for p in curve if p["accuracy"]["overall"] >= target), None)

    base, hit = first_at_target(baseline_curve), first_at_target(sparse_curve)
    return {
        "target": target,
        "baseline_seconds": base["train_seconds"],
        "sparse_seconds": hit["train_seconds"] if hit else None,
        "sparse_step": hit["step"] if hit else None,
        "speedup": base["train_seconds"] / max(hit["train_seconds"], 1e-9) if hit else None,
    }


def time_to_accuracy_sentence(result: dict[str, Any] | None) -> str:
    if result is None:
        return "No time to accuracy: no accuracy curves, or the baseline's final curve accuracy is 0."
    if result["sparse_seconds"] is None:
        return (
            f"The sparse run did not reach the baseline's final curve accuracy ({_pct(result['target'])} %) at any "
            "curve point."
        )
    return (
        f"Time to the baseline's final accuracy on the curve subset ({_pct(result['target'])} %): "
        f"{result['sparse_seconds']:.0f} s for the sparse run (step {result['sparse_step']}), "
        f"{result['baseline_seconds']:.0f} s for the baseline: {result['speedup']:.2f}x."
    )


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps spread evenly over the run, the last one at `max_steps`."""
    points = max(1, min(points, max_steps))
    return sorted({max(1, round(max_steps * (i + 1) / points)) for i in range(points)})


# ---- one training run ----------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: DemoConfig,
    dataset,
    *,
    sparse_config: SparseMLLMConfig | None = None,
    output_dir: str | os.PathLike = "outputs/demo/run",
    save_model_dir: str | os.PathLike | None = None,
    compressed_eval: tuple[str, float] | None = None,
    progress: bool = True,
    curve: bool = True,
) -> dict[str, Any]:
    """Train one tiny LLaVA (stock `Trainer` when `sparse_config` is `None`) and evaluate it with all visual tokens.

    Returns a dict with `train_seconds` (excluding curve evaluations), `accuracy` (overall exact match),
    `accuracy_by_family`, `steps`, `loss_history` (`(step, loss)` pairs), `curve`, `run_seconds` (the whole call),
    for sparse runs `slow_step_fraction` and (with layer skipping) the per-layer `skip_frequency`, and, when
    `compressed_eval` is `(compressor, keep_ratio)`, `compressed_accuracy` / `compressed_accuracy_by_family` from
    compressed inference.
    """
    run_start = time.perf_counter()
    torch.set_num_threads(config.threads)
    model, processor = build_model(config)
    test = dataset["test"]
    curve_subset = test.select(range(min(config.curve_samples, len(test)))) if curve else None
    callback = AccuracyCurveCallback(
        processor,
        curve_subset,
        curve_steps(config.max_steps, config.curve_points) if curve else [],
        batch_size=config.eval_batch_size,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=config.dataloader_workers,
    )
    common = dict(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        data_collator=FastVisionLanguageCollator(processor),
        processing_class=processor,
        callbacks=[callback],
    )
    if sparse_config is None:
        trainer = Trainer(**common)
    else:
        trainer = SparseMLLMTrainer(**common, sparse_config=sparse_config)
    trainer.train()

    accuracy = evaluate_vqa(model, processor, test, batch_size=config.eval_batch_size, progress=progress)
    result: dict[str, Any] = {
        "trainer": type(trainer).__name__,
        "sparse_recipe": sparse_config.recipe_dict() if sparse_config is not None else None,
        "train_seconds": callback.train_seconds,
        "train_cpu_seconds": callback.train_cpu_seconds,
        "curve_eval_seconds": callback.eval_seconds,
        "steps": trainer.state.global_step,
        "accuracy": accuracy["overall"],
        "accuracy_by_family": accuracy,
        "loss_history": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        "curve": callback.curve,
    }
    if sparse_config is not None:
        slow = [e.get("sparse/slow_step") for e in trainer.state.log_history if "sparse/slow_step" in e]
        result["slow_step_fraction"] = sum(slow) / len(slow) if slow else 0.0
        # The trainer logs the per-layer histogram with the final training metrics, the last log entry.
        prefix = "sparse/skip_frequency/"
        frequency = {k[len(prefix) :]: v for k, v in trainer.state.log_history[-1].items() if k.startswith(prefix)}
        if frequency:
            result["skip_frequency"] = frequency
    if compressed_eval is not None:
        compressor, keep_ratio = compressed_eval
        compressed = evaluate_vqa(
            model,
            processor,
            test,
            batch_size=config.eval_batch_size,
            token_compressor=compressor,
            keep_ratio=keep_ratio,
            progress=progress,
        )
        result["compressed_eval"] = {"token_compressor": compressor, "keep_ratio": keep_ratio}
        result["compressed_accuracy"] = compressed["overall"]
        result["compressed_accuracy_by_family"] = compressed
    if save_model_dir is not None:
        trainer.save_model(str(save_model_dir))
        processor.save_pretrained(str(save_model_dir))
        result["model_dir"] = str(save_model_dir)
    result["run_seconds"] = time.perf_counter() - run_start  # training, curve points and evaluations
    return result


# ---- the demo ------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "hf_sparse_mllm": __version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def run_demo(
    config: DemoConfig,
    output_dir: str | os.PathLike = "outputs/demo",
    data_dir: str | os.PathLike | None = "outputs/data",
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Train the baseline and the sparse run, evaluate both with all visual tokens, write the report folder.

    Writes `report.md`, `report.json`, `loss.png` and `accuracy_vs_time.png` to `output_dir`, and the sparse-trained
    model with its processor to `output_dir/sparse_model`. Returns the report dict.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    dataset = prepare_data(config, data_dir, progress=progress)
    data_seconds = time.perf_counter() - start
    blind = blind_baseline(dataset["train"], dataset["test"])

    runs = {}
    print(f"[demo] baseline: stock transformers.Trainer, {config.max_steps} steps", flush=True)
    runs["baseline"] = train_and_evaluate(config, dataset, output_dir=output_dir / "baseline", progress=progress)
    sparse = config.sparse_config()
    print(
        f"[demo] sparse: SparseMLLMTrainer ({sparse.token_compressor}, keep_ratio={sparse.keep_ratio}, "
        f"slow_mode_prob={sparse.slow_mode_prob}), {config.max_steps} steps",
        flush=True,
    )
    runs["sparse"] = train_and_evaluate(
        config,
        dataset,
        sparse_config=sparse,
        output_dir=output_dir / "sparse",
        save_model_dir=output_dir / "sparse_model",
        progress=progress,
    )
    base, fast = runs["baseline"], runs["sparse"]
    report = {
        "speedup": base["train_seconds"] / max(fast["train_seconds"], 1e-9),
        "speedup_cpu_time": base["train_cpu_seconds"] / max(fast["train_cpu_seconds"], 1e-9),
        # Undefined (None) when the baseline answered nothing right, as in a few-step smoke run.
        "accuracy_retained": fast["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else None,
        "time_to_baseline_accuracy": time_to_accuracy(base["curve"], fast["curve"]),
        "runs": runs,
        "blind_baseline": blind,
        "config": asdict(config),
        "num_visual_tokens": config.num_visual_tokens,
        "kept_visual_tokens": max(1, round(config.keep_ratio * config.num_visual_tokens)),
        "data_seconds": data_seconds,
        "total_seconds": time.perf_counter() - start,
        "machine": machine_info(),
        "sparse_model_dir": str(output_dir / "sparse_model"),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        write_plots(report, output_dir)
    markdown = format_report(report)
    (output_dir / "report.md").write_text(markdown)
    report["total_seconds"] = time.perf_counter() - start
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The comparison table (markdown): time, speed-up, accuracy overall and per family, accuracy retained."""
    runs, blind = report["runs"], report["blind_baseline"]
    families = [f for f in FAMILIES if f in runs["baseline"]["accuracy_by_family"]]
    header = ["run", "train time (s)", "speed-up", "CPU time (s)", "speed-up (CPU)", "overall %"]
    header += [*[f"{f} %" for f in families], "retained %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = runs["baseline"]
    for name, run in runs.items():
        speed = base["train_seconds"] / max(run["train_seconds"], 1e-9)
        acc = run["accuracy_by_family"]
        retained = run["accuracy"] / base["accuracy"] if base["accuracy"] else None
        cpu = run.get("train_cpu_seconds")
        cpu_speed = base.get("train_cpu_seconds", 0) / cpu if cpu else None
        cells = [
            name,
            f"{run['train_seconds']:.1f}",
            f"{speed:.2f}x",
            f"{cpu:.1f}" if cpu else "-",
            f"{cpu_speed:.2f}x" if cpu_speed else "-",
            _pct(acc["overall"]),
            *[_pct(acc.get(f, float("nan"))) for f in families],
            _pct(retained),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    cells = [
        "blind (question only)",
        "-",
        "-",
        "-",
        "-",
        _pct(blind["overall"]),
        *[_pct(blind.get(f)) for f in families],
        "-",
    ]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_report(report: dict[str, Any]) -> str:
    config = report["config"]
    recipe = report["runs"]["sparse"]["sparse_recipe"]
    lines = [
        "# hf-sparse-mllm demo",
        "",
        f"Tiny LLaVA (CLIP-style tower {config['vision_layers']} x {config['vision_hidden_size']}, Llama-style decoder "
        f"{config['num_hidden_layers']} x {config['hidden_size']}) trained from scratch on the generated CLEVR-like VQA "
        f"data: {config['image_size']} px images, {config['patch_size']} px patches = {report['num_visual_tokens']} "
        f"visual tokens, {config['train_samples']} training and {config['test_samples']} test questions, "
        f"{config['max_steps']} steps of batch {config['batch_size']}, AdamW {config['learning_rate']:g} "
        f"({config['warmup_steps']} warm-up steps, cosine), seed {config['seed']}.",
        "",
        "* **baseline**: the stock `transformers.Trainer`.",
        f"* **sparse**: `SparseMLLMTrainer` with `{recipe['token_compressor']}` keeping "
        f"{report['kept_visual_tokens']} of {report['num_visual_tokens']} visual tokens (keep_ratio "
        f"{recipe['keep_ratio']}) plus {recipe['num_isolator_tokens']} isolator tokens on fast steps, "
        f"slow_mode_prob {recipe['slow_mode_prob']} (measured slow-step fraction "
        f"{report['runs']['sparse'].get('slow_step_fraction', 0):.2f}).",
        "",
        "Both models are evaluated with **all** visual tokens (greedy generation, exact match) on the same test set. "
        "Training time is wall-clock, without the accuracy-curve evaluations.",
        "",
        format_table(report),
        f"**Speed-up {report['speedup']:.2f}x (wall clock; {report['speedup_cpu_time']:.2f}x in process CPU time), "
        f"accuracy retained {_pct(report['accuracy_retained'])} %.** "
        + time_to_accuracy_sentence(report.get("time_to_baseline_accuracy")),
        "",
        f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
        f"{report['machine']['threads']} threads on {report['machine']['cpus']} CPUs. "
        f"Total demo time {report['total_seconds']:.0f} s.",
        "",
        "![loss](loss.png)",
        "",
        "![accuracy vs training time](accuracy_vs_time.png)",
        "",
        f"The sparse-trained model: `{report['sparse_model_dir']}` (loads with "
        "`AutoModelForImageTextToText.from_pretrained`).",
        "",
    ]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """`loss.png` (training loss vs step) and `accuracy_vs_time.png` (curve-subset accuracy vs training time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in report["runs"].items():
        if run["loss_history"]:
            steps, losses = zip(*run["loss_history"])
            ax.plot(steps, losses, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png", dpi=100)
    plt.close(fig)
    paths.append(str(output_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in report["runs"].items():
        if run["curve"]:
            ax.plot(
                [0] + [p["train_seconds"] for p in run["curve"]],
                [None] + [100 * p["accuracy"]["overall"] for p in run["curve"]],
                marker="o",
                label=name,
            )
    blind = report.get("blind_baseline", {}).get("overall")
    if blind is not None:
        ax.axhline(100 * blind, color="grey", linestyle="--", label="blind (question only)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy, all visual tokens (%)")
    ax.set_title("Accuracy vs training time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy_vs_time.png", dpi=100)
    plt.close(fig)
    paths.append(str(output_dir / "accuracy_vs_time.png"))
    return paths


__all__ = [
    "DEMO_PRESETS",
    "AccuracyCurveCallback",
    "DemoConfig",
    "FastVisionLanguageCollator",
    "build_model",
    "evaluate_vqa",
    "exact_match_accuracy",
    "format_report",
    "format_table",
    "prepare_data",
    "run_demo",
    "time_to_accuracy",
    "time_to_accuracy_sentence",
    "train_and_evaluate",
    "write_plots",
]

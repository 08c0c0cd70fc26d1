"""Training runs of the harness: one tiny LLaVA trained with the stock `Trainer` or `SparseMLLMTrainer`, timed
without its evaluations, then scored with all visual tokens (and optionally compressed ones); and the demo, which
compares the two trainers on the same data.

`benchmarks/demo.py` (`make demo`) and `benchmarks/bench_accuracy.py` (`make bench-accuracy`) are command lines over
[`run_demo`] and [`train_and_evaluate`]. Everything is built offline: the data is generated (and cached), the model is
built from a config, the tokenizer is a word-level one.

```python
>>> from benchmarks.harness.runs import curve_steps
>>> curve_steps(2000, 8)
[250, 500, 750, 1000, 1250, 1500, 1750, 2000]

```
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer, __version__
from hf_sparse_mllm.data.vqa import blind_baseline

from .collator import VQABatchCollator
from .data import prepare_data
from .presets import DemoConfig, build_model
from .reports import format_report, time_to_accuracy, write_plots
from .scoring import score_vqa, vqa_task


class AccuracyCurveCallback(TrainerCallback):
    """Evaluate a small test subset at a few steps and measure the training time without those evaluations.

    `train_seconds` is the wall-clock time from `on_train_begin` to `on_train_end` minus the time spent here
    evaluating; `train_cpu_seconds` is the same for this process's CPU time, which other processes on a shared
    machine disturb far less than the wall clock (with one torch thread it is the compute the run needed); `curve`
    is a list of `{"step", "train_seconds", "accuracy"}` points, `accuracy` as [`~scoring.accuracy_by_family`] returns
    it for the first `limit` samples of `task`.

    Args:
        processor (`ProcessorMixin`): the model's processor.
        task ([`~hf_sparse_mllm.evaluation.Task`], *optional*): the `sparse_vqa` task on the test split; `None`
            records no curve (the times are still measured).
        limit (`int`): samples of `task` evaluated at each curve point.
        eval_steps (`list[int]`): the optimizer steps after which to evaluate.
        batch_size (`int`, *optional*, defaults to `100`): prompts per `generate` call.
    """

    def __init__(self, processor, task, limit: int, eval_steps: list[int], batch_size: int = 100):
        self.processor = processor
        self.task = task
        self.limit = limit
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
        if state.global_step not in self.eval_steps or model is None or self.task is None:
            return
        elapsed = self._elapsed()
        start, cpu_start = time.perf_counter(), time.process_time()
        accuracy = score_vqa(
            model, self.processor, self.task, batch_size=self.batch_size, limit=self.limit, progress=False
        )
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        self.curve.append({"step": state.global_step, "train_seconds": elapsed, "accuracy": accuracy})

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = self._elapsed()
        self.train_cpu_seconds = time.process_time() - self._cpu_start - self.eval_cpu_seconds


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps spread evenly over the run, the last one at `max_steps`."""
    points = max(1, min(points, max_steps))
    return sorted({max(1, round(max_steps * (i + 1) / points)) for i in range(points)})


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

    The evaluations are `evaluate(model, processor, [sparse_vqa on dataset["test"]])`; their lmms-eval results files
    go to `output_dir/eval/full` (and `output_dir/eval/compressed`).

    Returns a dict with `train_seconds` (excluding curve evaluations), `accuracy` (overall exact match),
    `accuracy_by_family`, `steps`, `loss_history` (`(step, loss)` pairs), `curve`, `run_seconds` (the whole call),
    for sparse runs `slow_step_fraction` and (with layer skipping) the per-layer `skip_frequency`, and, when
    `compressed_eval` is `(compressor, keep_ratio)`, `compressed_accuracy` / `compressed_accuracy_by_family` from
    compressed inference.
    """
    run_start = time.perf_counter()
    torch.set_num_threads(config.threads)
    model, processor = build_model(config)
    task = vqa_task(dataset["test"])
    curve = curve and config.curve_samples > 0 and config.curve_points > 0
    callback = AccuracyCurveCallback(
        processor,
        task if curve else None,
        config.curve_samples,
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
        data_collator=VQABatchCollator(processor),
        processing_class=processor,
        callbacks=[callback],
    )
    if sparse_config is None:
        trainer = Trainer(**common)
    else:
        trainer = SparseMLLMTrainer(**common, sparse_config=sparse_config)
    trainer.train()

    eval_dir = Path(output_dir) / "eval"
    scoring = dict(batch_size=config.eval_batch_size, progress=progress)
    accuracy = score_vqa(model, processor, task, output_dir=eval_dir / "full", **scoring)
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
        "eval_dir": str(eval_dir),
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
        compressed = score_vqa(
            model,
            processor,
            task,
            token_compressor=compressor,
            keep_ratio=keep_ratio,
            output_dir=eval_dir / "compressed",
            **scoring,
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


def machine_info() -> dict[str, Any]:
    """What a run's time depends on besides its configuration: platform, versions, CPUs, threads, device."""
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

    Writes `report.md`, `report.json` and (with `plots`, which needs matplotlib) `loss.png` and
    `accuracy_vs_time.png` to `output_dir`, the sparse-trained model with its processor to
    `output_dir/sparse_model`, and each run's lmms-eval results files to `output_dir/<run>/eval/full`. Returns the
    report dict.
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
        "config": config.to_dict(),
        "num_visual_tokens": config.num_visual_tokens,
        "kept_visual_tokens": config.kept_visual_tokens,
        "data_seconds": data_seconds,
        "total_seconds": time.perf_counter() - start,
        "machine": machine_info(),
        "sparse_model_dir": str(output_dir / "sparse_model"),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # kept if plotting fails
    if plots:
        write_plots(report, output_dir)
    (output_dir / "report.md").write_text(format_report(report))
    report["total_seconds"] = time.perf_counter() - start
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

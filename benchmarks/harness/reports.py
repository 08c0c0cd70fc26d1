"""The harness's reports: the comparison table, the demo's markdown report, time to accuracy, and the plots.

Plotting needs matplotlib, a harness requirement (`benchmarks/requirements.txt`), not a dependency of the library.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hf_sparse_mllm.data.vqa import FAMILIES

from .presets import describe_model


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


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
    """One sentence on [`time_to_accuracy`]'s result, for the report and the command line."""
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
    """The demo's `report.md`: the setup in words, [`format_table`], the headline numbers and the plots."""
    config = report["config"]
    recipe = report["runs"]["sparse"]["sparse_recipe"]
    lines = [
        "# hf-sparse-mllm demo",
        "",
        f"{describe_model(config)}, trained from scratch on the generated CLEVR-like VQA data: "
        f"{config['train_samples']} training and {config['test_samples']} test questions, "
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
        "Both models are evaluated with **all** visual tokens on the same test set (greedy generation, the `sparse_vqa` "
        "task's exact match: `hf_sparse_mllm.evaluation.evaluate`). "
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

    def save(fig, ax, name, xlabel, ylabel, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        return str(output_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in report["runs"].items():
        if run["loss_history"]:
            steps, losses = zip(*run["loss_history"])
            ax.plot(steps, losses, label=name)
    ax.set_yscale("log")
    paths = [save(fig, ax, "loss.png", "optimizer step", "training loss", "Training loss")]

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
    ylabel = "test accuracy, all visual tokens (%)"
    paths.append(save(fig, ax, "accuracy_vs_time.png", "training time (s)", ylabel, "Accuracy vs training time"))
    return paths

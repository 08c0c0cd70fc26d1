"""`make demo`: train a tiny LLaVA with the stock `Trainer` and with `SparseMLLMTrainer`, compare speed and accuracy.

    python -m benchmarks.demo                     # the full demo (about 10 minutes on an idle 2-core CPU)
    python -m benchmarks.demo --quick             # a smoke run (well under a minute)
    python -m benchmarks.demo --preset bench      # the accuracy benchmark's larger model (144 visual tokens)
    python -m benchmarks.demo --steps 3000 --train-samples 40000 --output outputs/demo-long
    python -m benchmarks.demo --keep-ratio 0.1 --compressor divprune --slow-mode-prob 0.1

Run from the repository root. Both runs use the same generated data (cached under `outputs/data/`), the same seed,
the same number of steps, and are evaluated with all visual tokens on the same test set by the evaluation package's
`sparse_vqa` task (`hf_sparse_mllm.evaluation.evaluate`). The report folder (default `outputs/demo/`) gets
`report.md`, `report.json`, `loss.png`, `accuracy_vs_time.png`, each run's lmms-eval results files in
`<run>/eval/full/` and the sparse-trained model in `sparse_model/`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from benchmarks.harness import DEMO_PRESETS, format_table, run_demo, time_to_accuracy_sentence


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(DEMO_PRESETS), default="default", help="data and model size (default: the demo's)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (seconds): --preset quick, whatever --preset says"
    )
    parser.add_argument(
        "--output", default=None, help="report folder (default outputs/demo, or outputs/demo-<preset>)"
    )
    parser.add_argument("--data-dir", default="outputs/data", help="cache of the generated dataset")
    parser.add_argument("--train-samples", type=int, help="generated training question-answer pairs")
    parser.add_argument("--test-samples", type=int, help="generated test pairs")
    parser.add_argument("--steps", type=int, help="optimizer steps of each run")
    parser.add_argument("--epochs", type=float, help="passes over the training set (sets --steps)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--workers", type=int, help="dataloader worker processes (default 1: data on the second core)")
    parser.add_argument("--compressor", help="sparse run's token compressor (default divprune)")
    parser.add_argument("--keep-ratio", type=float, help="sparse run's keep ratio")
    parser.add_argument("--slow-mode-prob", type=float, help="sparse run's slow-step probability")
    parser.add_argument("--no-plots", action="store_true", help="no loss and accuracy plots (they need matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = "quick" if args.quick else args.preset
    config = DEMO_PRESETS[preset]
    overrides = {
        "train_samples": args.train_samples,
        "test_samples": args.test_samples,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "threads": args.threads,
        "dataloader_workers": args.workers,
        "token_compressor": args.compressor,
        "keep_ratio": args.keep_ratio,
        "slow_mode_prob": args.slow_mode_prob,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.epochs is not None:
        config = replace(config, max_steps=max(1, round(args.epochs * config.train_samples / config.batch_size)))
    output = args.output or ("outputs/demo" if preset == "default" else f"outputs/demo-{preset}")
    report = run_demo(
        config, output_dir=output, data_dir=args.data_dir, progress=not args.no_progress, plots=not args.no_plots
    )
    print()
    print(format_table(report))
    retained = report["accuracy_retained"]
    retained = "n/a" if retained is None else f"{100 * retained:.1f} %"
    print(
        f"Speed-up {report['speedup']:.2f}x, accuracy retained {retained} "
        f"(both evaluated with all {report['num_visual_tokens']} visual tokens). Total {report['total_seconds']:.0f} s."
    )
    print(time_to_accuracy_sentence(report["time_to_baseline_accuracy"]))
    print(f"[demo] report: {Path(output).resolve()}  (report.md, report.json, loss.png, accuracy_vs_time.png)")
    print(f"[demo] sparse-trained model: {Path(report['sparse_model_dir']).resolve()}")
    return report


if __name__ == "__main__":
    main()

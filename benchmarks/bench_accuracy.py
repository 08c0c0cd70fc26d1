"""Accuracy benchmark: sparse-training recipes vs the stock `Trainer` on the generated VQA data.

    python -m benchmarks.bench_accuracy                 # default recipes, 1 seed -> benchmarks/results/accuracy.*
    python -m benchmarks.bench_accuracy --seeds 0,1,2 --steps 1500
    python -m benchmarks.bench_accuracy --recipes baseline,dualspeed-divprune-0.25,naive-divprune-0.25 --quick
    python -m benchmarks.bench_accuracy --seeds 0,1 --resume              # add seed 1, keep the finished seed-0 runs
    python -m benchmarks.bench_accuracy --seeds 0 --output outputs/s0 &  # one seed per core...
    python -m benchmarks.bench_accuracy --seeds 1 --output outputs/s1; wait
    python -m benchmarks.bench_accuracy --seeds 0,1 --merge outputs/s{0,1}/accuracy.json  # ...then one summary

Every recipe trains the same tiny model (the `--preset`'s data, model and steps; by default `bench`: the demo's LLaVA
at 144 visual tokens, 3,000 steps; `bench-qwen2vl`: a tiny Qwen2-VL, an M-RoPE model; one run per seed), then
evaluates it twice on the same test set with the evaluation package's `sparse_vqa` task: with **all** visual tokens
(how the exported model is used) and with the recipe's **compressed** tokens (the training-time view; no isolator at
inference). Naive pruning (fast mode only: no slow steps, no isolator) is good at compressed inference and worse with
all tokens; DualSpeed's slow steps and mode isolator close that training-inference gap. Reported per recipe:
training time and speed-up over the baseline, accuracy (mean and standard deviation over seeds) with full and
compressed tokens, accuracy retained, and per family accuracy. Writes `accuracy.json` and `accuracy.md` to `--output`
(default `benchmarks/results`; `accuracy-<preset>.*` for presets other than `bench`, `...-quick.*` for `--quick`).
`--resume` keeps the finished runs of that file (same configuration, recipe and kind of machine), including runs of
recipes or seeds left out of this invocation's summary; `--merge` keeps those of other results files too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import DEMO_PRESETS, DemoConfig, machine_info, prepare_data, train_and_evaluate
from benchmarks.harness.presets import describe_model
from hf_sparse_mllm import SparseMLLMConfig
from hf_sparse_mllm.checkpoints import recipe_changes
from hf_sparse_mllm.data.vqa import FAMILIES, blind_baseline


def recipe(compressor, keep_ratio, slow_mode_prob=0.1, num_isolator_tokens=4, **layer_skipping):
    return dict(
        token_compressor=compressor,
        keep_ratio=keep_ratio,
        slow_mode_prob=slow_mode_prob,
        num_isolator_tokens=num_isolator_tokens,
        **layer_skipping,
    )


def stochastic_recipe(keep_ratio, max_skip_prob):
    """DivPrune + DualSpeed with 5 % slow steps + stochastic depth on every step, slow ones included."""
    return recipe(
        "divprune",
        keep_ratio,
        slow_mode_prob=0.05,
        layer_skip_policy="stochastic",
        max_skip_prob=max_skip_prob,
        skip_on_slow_steps=True,
    )


RECIPES = {
    "baseline": None,  # the stock transformers.Trainer
    "dualspeed-divprune-0.25": recipe("divprune", 0.25),
    "dualspeed-divprune-0.1": recipe("divprune", 0.1),
    "naive-divprune-0.25": recipe("divprune", 0.25, slow_mode_prob=0.0, num_isolator_tokens=0),
    "naive-divprune-0.1": recipe("divprune", 0.1, slow_mode_prob=0.0, num_isolator_tokens=0),
    "dualspeed-divprune-0.25-slow0.2": recipe("divprune", 0.25, slow_mode_prob=0.2),
    "dualspeed-random-0.25": recipe("random", 0.25),
    "dualspeed-pool-0.25": recipe("pool", 0.25),
    "dualspeed-redundancy-0.25": recipe("redundancy", 0.25),
    # The full Sparse Training Scheme: compression + DualSpeed + layer skipping on fast steps (slow steps run all
    # layers). With 4 decoder layers and the first and last protected, skip_ratio 0.25 drops one middle layer a step.
    "sts-divprune-0.1-skip0.25": recipe("divprune", 0.1, layer_skip_policy="redundancy", skip_ratio=0.25),
    "sts-divprune-0.1-stochastic": recipe("divprune", 0.1, layer_skip_policy="stochastic", max_skip_prob=0.5),
    # The same with slow steps (and their teacher) skipping layers too, as STS's instruction stage does.
    "sts-divprune-0.1-skip0.25-slowskip": recipe(
        "divprune", 0.1, layer_skip_policy="redundancy", skip_ratio=0.25, skip_on_slow_steps=True
    ),
    # Half the slow steps (each runs all 144 tokens and a fast-mode teacher), alone and with milder skipping:
    # stochastic depth that drops the two middle layers on 12.5 % and 25 % of the steps (0.375 layers a step, not 1).
    "dualspeed-divprune-0.1-slow0.05": recipe("divprune", 0.1, slow_mode_prob=0.05),
    "sts-divprune-0.1-stochastic0.25-slow0.05": stochastic_recipe(0.1, max_skip_prob=0.25),
    # Faster variants of it: more skipping (0.75 layers a step), or 7 visual tokens on fast steps.
    "sts-divprune-0.1-stochastic0.5-slow0.05": stochastic_recipe(0.1, max_skip_prob=0.5),
    "sts-divprune-0.05-stochastic0.25-slow0.05": stochastic_recipe(0.05, max_skip_prob=0.25),
}
DEFAULT_RECIPES = "baseline,dualspeed-divprune-0.25,naive-divprune-0.25,dualspeed-divprune-0.1,naive-divprune-0.1"
# The compressed evaluation of the baseline (which has no recipe of its own).
BASELINE_COMPRESSED_EVAL = ("divprune", 0.25)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, std, scale=100.0, digits=1):
    if mean is None:
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std else "")


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and standard deviation over seeds, speed-up and retention relative to the baseline's seed mean."""
    base_time, _ = _mean_std([r["train_seconds"] for r in runs["baseline"]])
    base_acc, _ = _mean_std([r["accuracy"] for r in runs["baseline"]])
    base_cpu, _ = _mean_std([r.get("train_cpu_seconds") for r in runs["baseline"]])
    summary = {}
    for name, seeds in runs.items():
        time_mean, time_std = _mean_std([r["train_seconds"] for r in seeds])
        cpu_mean, _ = _mean_std([r.get("train_cpu_seconds") for r in seeds])
        full_mean, full_std = _mean_std([r["accuracy"] for r in seeds])
        comp_mean, comp_std = _mean_std([r.get("compressed_accuracy") for r in seeds])
        retained = [r["accuracy"] / base_acc for r in seeds] if base_acc else [None]
        ret_mean, ret_std = _mean_std(retained)
        summary[name] = {
            "recipe": RECIPES.get(name),
            "seeds": len(seeds),
            "train_seconds_mean": time_mean,
            "train_seconds_std": time_std,
            "speedup": base_time / time_mean if time_mean else None,
            "train_cpu_seconds_mean": cpu_mean,
            "speedup_cpu_time": base_cpu / cpu_mean if cpu_mean and base_cpu else None,
            "full_accuracy_mean": full_mean,
            "full_accuracy_std": full_std,
            "compressed_accuracy_mean": comp_mean,
            "compressed_accuracy_std": comp_std,
            "accuracy_retained_mean": ret_mean,
            "accuracy_retained_std": ret_std,
            "full_accuracy_by_family": {
                f: statistics.fmean(r["accuracy_by_family"][f] for r in seeds)
                for f in FAMILIES
                if f in seeds[0]["accuracy_by_family"]
            },
            "compressed_eval": seeds[0].get("compressed_eval"),
        }
    return summary


def format_markdown(report: dict) -> str:
    config, summary = report["config"], report["summary"]
    blind = report["blind_baseline"]
    lines = [
        "# Accuracy benchmark",
        "",
        f"{describe_model(config)}, trained from scratch on the generated VQA data: {config['train_samples']} "
        f"training and {config['test_samples']} test questions, {config['max_steps']} steps "
        f"of batch {config['batch_size']}, AdamW {config['learning_rate']:g}; seeds {report['seeds']} "
        f"(mean ± standard deviation). Full = all visual tokens at inference; compressed = the recipe's compressor "
        f"and keep ratio at inference (baseline: {BASELINE_COMPRESSED_EVAL[0]} {BASELINE_COMPRESSED_EVAL[1]}), no "
        "isolator. Speed-up = baseline training time / recipe training time (same steps), in wall-clock time and in "
        "process CPU time (less disturbed by other processes on a shared machine).",
        "",
        f"Blind (question-only) baseline: {100 * blind['overall']:.1f} % overall.",
        "",
        "| recipe | slow prob | isolator | train s | speed-up | speed-up (CPU time) | full acc % | compressed acc % "
        "| retained (full) % |" + "".join(f" {f} % |" for f in FAMILIES),
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(FAMILIES),
    ]
    for name, s in summary.items():
        rec = s["recipe"] or {}
        fam = s["full_accuracy_by_family"]
        lines.append(
            f"| {name} | {rec.get('slow_mode_prob', '-')} | {rec.get('num_isolator_tokens', '-')} | "
            f"{_fmt(s['train_seconds_mean'], s['train_seconds_std'], 1, 0)} | {s['speedup']:.2f}x | "
            f"{'-' if s.get('speedup_cpu_time') is None else format(s['speedup_cpu_time'], '.2f') + 'x'} | "
            f"{_fmt(s['full_accuracy_mean'], s['full_accuracy_std'])} | "
            f"{_fmt(s['compressed_accuracy_mean'], s['compressed_accuracy_std'])} | "
            f"{_fmt(s['accuracy_retained_mean'], s['accuracy_retained_std'])} |"
            + "".join(f" {100 * fam[f]:.1f} |" if f in fam else " - |" for f in FAMILIES)
        )
    lines += [
        "",
        f"Run time of the whole benchmark: {report['total_seconds'] / 60:.1f} minutes on {report['machine']['cpus']} "
        f"CPUs ({report['machine']['threads']} torch threads), {report['machine']['platform']}.",
        "",
    ]
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# What a run's time depends on besides the configuration: runs timed on another kind of machine are not compared.
MACHINE_KEYS = ("cpus", "threads", "device", "torch", "python")


def same_recipe(saved: dict | None, expected: SparseMLLMConfig | None) -> bool:
    """Whether a saved run's `sparse_recipe` trains what `expected` trains (`None` for both: the stock `Trainer`).

    The saved dict is read back as a `SparseMLLMConfig` (fields it lacks take their defaults, as when the config
    gained one), and fields that change neither a decision nor the loss (the package version, `max_nonfinite_steps`,
    `resume_note`) are ignored, as when resuming from a checkpoint (`hf_sparse_mllm.checkpoints.recipe_changes`).

    Example:

    ```python
    >>> from hf_sparse_mllm import SparseMLLMConfig
    >>> from benchmarks.bench_accuracy import same_recipe
    >>> saved = SparseMLLMConfig(keep_ratio=0.1).recipe_dict()
    >>> del saved["max_nonfinite_steps"]  # a field added since
    >>> saved["sparse_mllm_version"] = "0.0.1"
    >>> same_recipe(saved, SparseMLLMConfig(keep_ratio=0.1)), same_recipe(saved, SparseMLLMConfig(keep_ratio=0.25))
    (True, False)

    ```
    """
    if saved is None or expected is None:
        return saved is None and expected is None
    try:
        recorded = SparseMLLMConfig.from_dict(saved).recipe_dict()
    except (TypeError, ValueError):  # a value this version no longer accepts
        return False
    # Through JSON, as the saved side went: tuples and lists compare equal.
    return not recipe_changes(json.loads(json.dumps(recorded)), json.loads(json.dumps(expected.recipe_dict())))


def _finished_runs(path: Path, config, machine: dict) -> dict[str, list[dict]]:
    """The runs of an earlier results file that `--resume` or `--merge` can keep: same configuration, same recipe
    ([`same_recipe`]: the resolved `SparseMLLMConfig`, not only its name) and timed on the same kind of machine.
    Incompatible runs are dropped with a message; a file made with another configuration raises `ValueError` (so it is
    never overwritten)."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    # The accuracy-curve and evaluation batch settings do not change what is trained or measured.
    ignored = {"curve_points", "curve_samples", "eval_batch_size"}
    saved_config = previous.get("config") or {}
    try:
        # Keys the file does not record have their default values (`DemoConfig.from_dict`).
        old = json.loads(json.dumps(DemoConfig.from_dict(saved_config).to_dict()))
    except ValueError:  # keys this version does not know
        old = saved_config
    new = json.loads(json.dumps(config.to_dict()))
    differs = sorted(k for k in old.keys() | new.keys() if k not in ignored and old.get(k) != new.get(k))
    if differs:
        raise ValueError(f"{path} was made with another configuration (differs in {differs})")
    here = {k: machine.get(k) for k in MACHINE_KEYS}
    saved: dict[str, list[dict]] = {}
    for group in ("runs", "runs_not_in_summary"):
        for name, done in (previous.get(group) or {}).items():
            saved.setdefault(name, []).extend(done)
    kept: dict[str, list[dict]] = {}
    for name, done in saved.items():
        for run in done:
            spec = RECIPES.get(name)
            expected = spec and replace(config, seed=run["seed"]).sparse_config(**spec)
            ran_on = run.get("machine") or previous.get("machine") or {}
            there = {k: ran_on.get(k) for k in MACHINE_KEYS}
            if name not in RECIPES or not same_recipe(run.get("sparse_recipe"), expected):
                why = "its recipe is no longer defined that way"
            elif there != here:
                why = f"it was timed on another machine ({there})"
            else:
                kept.setdefault(name, []).append(run)
                continue
            print(f"[bench-accuracy] dropping the earlier run of {name} seed {run['seed']}: {why}", flush=True)
    return kept


def _run_seconds(run: dict) -> float:
    # Runs saved before `run_seconds` existed count their training and curve time only.
    return run.get("run_seconds", run["train_seconds"] + run.get("curve_eval_seconds", 0.0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated names from {sorted(RECIPES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (data stays the same)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--train-samples", type=int)
    parser.add_argument("--test-samples", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--preset", choices=sorted(DEMO_PRESETS), default="bench", help="data and model size (default: bench)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (seconds): the quick preset's sizes with --preset's decoder depth; files end in -quick",
    )
    parser.add_argument("--no-curve", action="store_true", help="skip the accuracy-curve checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of the results file in --output (same configuration, recipes and kind of "
        "machine); train only the rest",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="FILE",
        help="other results files of the same configuration (e.g. one seed each, run side by side in separate "
        "processes): their finished runs are kept as --resume keeps those of --output",
    )
    parser.add_argument("--data-dir", default="outputs/data")
    parser.add_argument(
        "--output", default="benchmarks/results", help="where the results files (accuracy*.{json,md}) go"
    )
    parser.add_argument("--runs-dir", help="trainer output folders (default outputs/bench-accuracy/<preset>[-quick])")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {sorted(RECIPES)}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds is empty")
    config = DEMO_PRESETS[args.preset]
    if args.quick:
        # The smoke sizes, with the preset's family, patch size and decoder depth (so `bench-deep` still has layers to
        # skip, and `bench-qwen2vl` trains its M-RoPE model).
        quick = replace(DEMO_PRESETS["quick"], family=config.family)
        config = quick.with_model(num_hidden_layers=config.model.num_hidden_layers, patch_size=config.model.patch_size)
    overrides = {"max_steps": args.steps, "train_samples": args.train_samples, "test_samples": args.test_samples}
    overrides["threads"] = args.threads
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("accuracy" if args.preset == "bench" else f"accuracy-{args.preset}") + ("-quick" if args.quick else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    runs_dir = f"outputs/bench-accuracy/{args.preset}" + ("-quick" if args.quick else "")
    torch.set_num_threads(config.threads)
    machine = machine_info()
    finished: dict[str, list[dict]] = {}
    sources = [("--resume", json_path)] if args.resume else []
    for path in map(Path, args.merge):
        if not path.is_file():
            parser.error(f"--merge: no results file {path}")
        sources.append(("--merge", path))
    for option, path in sources:
        try:
            kept = _finished_runs(path, config, machine)
        except ValueError as error:
            hint = (
                "; run without --resume to replace it, or write elsewhere with --output"
                if option == "--resume"
                else ""
            )
            parser.error(f"{option}: {error}{hint}")
        for name, done in kept.items():
            for run in done:
                if any(r["seed"] == run["seed"] for r in finished.get(name, [])):
                    print(
                        f"[bench-accuracy] {path}: {name} seed {run['seed']} is already kept from an earlier file",
                        flush=True,
                    )
                else:
                    finished.setdefault(name, []).append(run)

    start = time.perf_counter()
    dataset = prepare_data(config, args.data_dir, progress=not args.no_progress)  # one data set for every run
    runs: dict[str, list[dict]] = {name: [] for name in names}
    # Finished runs of recipes or seeds not asked for now: left out of the summary, kept for a later --resume.
    set_aside: dict[str, list[dict]] = {}
    for name, done in finished.items():
        for run in done:
            (runs[name] if name in runs and run["seed"] in seeds else set_aside.setdefault(name, [])).append(run)
        aside = [r["seed"] for r in set_aside.get(name, [])]
        print(
            f"[bench-accuracy] resumed {name}: seeds {[r['seed'] for r in runs.get(name, [])]}"
            + (f"; seeds {aside} kept out of this summary (not asked for)" if aside else ""),
            flush=True,
        )
    report = {
        "config": config.to_dict(),
        "num_visual_tokens": config.num_visual_tokens,
        "seeds": seeds,
        "recipes": {name: RECIPES[name] for name in names},
        "blind_baseline": blind_baseline(dataset["train"], dataset["test"]),
        "machine": machine,
    }
    earlier_seconds = sum(_run_seconds(r) for done in runs.values() for r in done)

    def write_results():
        # After every run: a long benchmark can be inspected (or interrupted, then resumed) midway.
        report["runs"] = runs
        report["runs_not_in_summary"] = set_aside
        report["summary"] = summarize({k: v for k, v in runs.items() if v})
        # The kept runs' own time plus this invocation's.
        report["total_seconds"] = earlier_seconds + time.perf_counter() - start
        _write_atomically(json_path, json.dumps(report, indent=2) + "\n")
        _write_atomically(md_path, format_markdown(report))

    # Seeds outermost, so a run cut short still has every recipe for the first seeds.
    for seed in seeds:
        for name in names:
            if any(r["seed"] == seed for r in runs[name]):
                continue
            spec = RECIPES[name]
            run_config = replace(config, seed=seed)
            sparse_config = None
            compressed_eval = BASELINE_COMPRESSED_EVAL
            if spec is not None:
                sparse_config = run_config.sparse_config(**spec)
                compressed_eval = (spec["token_compressor"], spec["keep_ratio"])
            print(f"[bench-accuracy] seed {seed}: {name}", flush=True)
            result = train_and_evaluate(
                run_config,
                dataset,
                sparse_config=sparse_config,
                output_dir=Path(args.runs_dir or runs_dir) / f"{name}-seed{seed}",
                compressed_eval=compressed_eval,
                progress=not args.no_progress,
                curve=not args.no_curve,
            )
            result["seed"] = seed
            result["machine"] = machine  # checked by a later --resume
            runs[name].append(result)
            print(
                f"[bench-accuracy] seed {seed}: {name}: {result['train_seconds']:.0f} s, full "
                f"{100 * result['accuracy']:.1f} %, compressed {100 * result['compressed_accuracy']:.1f} %",
                flush=True,
            )
            write_results()
    write_results()
    markdown = format_markdown(report)
    print(markdown)
    print(f"[bench-accuracy] wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()

"""`hf-sparse-mllm eval`: evaluate a saved model folder on lmms-eval-style tasks, with full and/or compressed tokens.

    # held-out samples in the training format: the last assistant turn is the target
    hf-sparse-mllm eval --model_path outputs/llava-sparse --tasks conversational=data/test.jsonl

    # local benchmark copies (task=path), full tokens and DivPrune at 25 % of the tokens, results into the model card
    hf-sparse-mllm eval --model_path outputs/demo/sparse_model \\
        --tasks sparse_vqa=outputs/data/vqa gqa=/data/gqa_testdev pope=/data/pope.parquet \\
        --modes full divprune@0.25 --update_model_card

    # the generated VQA test split (built on the fly), benchmark suffixes replaced by none
    hf-sparse-mllm eval --model_path outputs/demo/sparse_model --tasks sparse_vqa gqa=/data/gqa --prompt_suffix ""

    # the same through make
    make eval EVAL_ARGS="--model_path outputs/demo/sparse_model --modes full divprune@0.25 random@0.25"

A mode is `full` or `<compressor>@<budget>`: a budget with a decimal point is a keep ratio (`divprune@0.25`), an
integer is a number of kept tokens per image (`pool@64`). Each mode writes `results.json` (lmms-eval's layout) and
`samples_<task>.jsonl` under `<output_dir>/<mode>/` (`output_dir` defaults to `<model_path>/eval`); with several
modes, `comparison.md` holds the table of all of them and their differences to the first one, which measures the
training-inference mismatch of a sparse recipe.
Tasks: `conversational=PATH` (a dataset in the training format, scored by `exact_match` and `normalized_match` on
its last assistant turn), `sparse_vqa` (without a path: 1,000 generated test scenes at the model's image size, one
patch per cell), and local copies of `gqa`, `vqav2_val`, `pope`, `mme`, `scienceqa_img` in the lmms-lab layouts (see
`hf_sparse_mllm.evaluation.tasks`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import TrlParser

from .arguments import parse_or_exit


@dataclass
class EvaluateArguments:
    model_path: str = field(metadata={"help": "Saved model folder (weights, config and processor) or a Hub id."})
    tasks: list[str] = field(
        default_factory=lambda: ["sparse_vqa"],
        metadata={
            "help": "Tasks as `name` or `name=dataset_path` (a save_to_disk folder, parquet/JSON file or Hub id), "
            "e.g. `conversational=test.jsonl`."
        },
    )
    modes: list[str] = field(
        default_factory=lambda: ["full"],
        metadata={"help": "`full` and/or `<compressor>@<keep_ratio or num_keep>`, e.g. `divprune@0.25`, `pool@64`."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where results go; defaults to `<model_path>/eval` (`outputs/eval/<name>` for a Hub id)."},
    )
    prompt_suffix: str | None = field(
        default=None,
        metadata={
            "help": "Replaces every task's prompt suffix (lmms-eval's `post_prompt`, e.g. GQA's \"\\nAnswer the "
            'question using a single word or phrase."); `""` for none; `\\n` stands for a newline. Unset: each '
            "task's own (none for conversational)."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate call."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Overrides every task's generation limit."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N samples of each task."})
    device: str = field(default="auto", metadata={"help": "`auto`, `cpu`, `cuda`, ..."})
    dtype: str = field(
        default="auto", metadata={"help": "`auto` (the checkpoint's), `float32`, `bfloat16`, `float16`."}
    )
    update_model_card: bool = field(
        default=False, metadata={"help": "Add the results to `<model_path>/README.md` as model-index entries."}
    )


def parse_mode(mode: str) -> dict:
    """`"full"` -> no compression; `"divprune@0.25"` -> keep_ratio 0.25; `"pool@64"` -> num_keep 64."""
    if mode == "full":
        return {"token_compressor": None, "keep_ratio": None, "num_keep": None}
    name, sep, budget = mode.partition("@")
    if not sep or not name or not budget:
        raise ValueError(f"Mode {mode!r} is not `full` or `<compressor>@<budget>` (e.g. `divprune@0.25`).")
    try:
        if "." in budget:
            return {"token_compressor": name, "keep_ratio": float(budget), "num_keep": None}
        return {"token_compressor": name, "keep_ratio": None, "num_keep": int(budget)}
    except ValueError:
        raise ValueError(f"Mode {mode!r}: the budget {budget!r} is neither a keep ratio nor a token count.") from None


def default_output_dir(model_path: str) -> str:
    """`<model_path>/eval` for a local folder, `outputs/eval/<name>` for a Hub id."""
    if os.path.isdir(model_path):
        return os.path.join(model_path, "eval")
    return os.path.join("outputs", "eval", os.path.basename(os.path.normpath(model_path)))


def build_tasks(specs: Sequence[str], prompt_suffix: str | None = None) -> list:
    """Tasks from `name` / `name=path` specs, with `prompt_suffix` (if given) as every task's `post_prompt`."""
    from ..evaluation import get_task

    overrides = {} if prompt_suffix is None else {"prompt_kwargs": {"post_prompt": prompt_suffix.replace("\\n", "\n")}}
    tasks = []
    for spec in specs:
        name, _, path = spec.partition("=")
        tasks.append(get_task(name, dataset_path=path or None, **overrides))
    return tasks


def run(args: EvaluateArguments) -> dict[str, dict]:
    """Evaluate `args.model_path` in every mode; return `{mode: results}` and write the files (see the module)."""
    from ..evaluation import add_results_to_model_card, evaluate, format_comparison_table, format_results_table
    from ..evaluation.evaluator import _atomic_write, load_for_evaluation, task_for_model
    from ..evaluation.generation import resolve_compression

    modes = {mode: parse_mode(mode) for mode in dict.fromkeys(args.modes)}
    tasks = build_tasks(args.tasks, args.prompt_suffix)
    model, processor = load_for_evaluation(args.model_path, device=args.device, dtype=args.dtype)
    tasks = [task_for_model(task, model) for task in tasks]  # sparse_vqa scenes at the model's image geometry
    for setting in modes.values():  # an unknown compressor or a bad budget fails before any generation
        resolve_compression(model, **setting)
    for task in tasks:  # so does a missing dataset or a wrong layout
        task.load(limit=args.limit)
    output_dir = args.output_dir or default_output_dir(args.model_path)

    runs = {}
    for mode, setting in modes.items():
        model_args = f"pretrained={args.model_path}" + "".join(
            f",{key}={value}" for key, value in setting.items() if value is not None
        )
        results = evaluate(
            model,
            processor,
            tasks,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            output_dir=os.path.join(output_dir, mode.replace("@", "_")),
            model_args=model_args,
            **setting,
        )
        runs[mode] = results
        print(f"\n## {mode} ({model_args})\n\n{format_results_table(results)}")
    if len(runs) > 1:
        table = format_comparison_table(runs)
        _atomic_write(os.path.join(output_dir, "comparison.md"), table + "\n")
        print(f"\n## Comparison\n\n{table}")
    if args.update_model_card:
        if not os.path.isdir(args.model_path):
            raise ValueError(f"--update_model_card needs a local model folder, got {args.model_path!r}.")
        path = add_results_to_model_card(args.model_path, list(runs.values()))
        print(f"\nModel card updated: {path}")
    print(f"\nResults written under {output_dir}")
    return runs


def make_parser(prog: str = "hf-sparse-mllm eval") -> TrlParser:
    """`EvaluateArguments` as flags, and `--config eval.yaml` with the same keys (as `train`)."""
    return TrlParser(EvaluateArguments, prog=prog)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    (args,) = parse_or_exit(parser, argv)
    try:  # what can be checked without loading the model exits with a usage error
        for mode in args.modes:
            parse_mode(mode)
        build_tasks(args.tasks, args.prompt_suffix)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    run(args)
    return 0


__all__ = ["EvaluateArguments", "build_tasks", "default_output_dir", "main", "make_parser", "parse_mode", "run"]

"""lmms-eval integration: a model plugin for saved checkpoints and task YAMLs for local copies of the built-in tasks.

With lmms-eval installed (`make install-lmms-eval`) and this package installed, the `lmms_eval.models` entry point
in `pyproject.toml` registers the model `sparse_mllm`:

```bash
lmms-eval --model sparse_mllm \\
    --model_args pretrained=outputs/demo/sparse_model,token_compressor=divprune,keep_ratio=0.25 \\
    --tasks sparse_vqa_local --include_path outputs/lmms_tasks --batch_size 32 --output_path outputs/lmms_eval
```

The plugin builds prompts, batches and decodes exactly as the built-in evaluator
([`~hf_sparse_mllm.evaluation.evaluate`]) does, so the two report the same numbers on the same model and data.
[`export_lmms_eval_task`] writes a task YAML for a local dataset (`dataset_kwargs: {load_from_disk: true}` for a
`save_to_disk` folder) whose functions are the built-in task's own, so lmms-eval scores it with the same rules.

This module imports without lmms-eval; only instantiating [`SparseMLLMLmms`] needs it.
"""

from __future__ import annotations

import os
import warnings

from .generation import (
    continuation_logprob,
    generate_from_prompts,
    length_sort_key,
    messages_from_context,
    render_prompt,
    resolve_compression,
    to_pil,
)
from .tasks import Task, get_task, list_tasks, lmms_eval_dataset_spec, mean

try:  # lmms-eval is an optional extra: `pip install hf-sparse-mllm[eval]` or `make install-lmms-eval`
    from lmms_eval.api.model import lmms as _LmmsBase

    LMMS_EVAL_AVAILABLE = True
except ImportError:  # the module still imports, so the task exporter and docs work without it
    _LmmsBase = object
    LMMS_EVAL_AVAILABLE = False

MODEL_NAME = "sparse_mllm"
# The maximum generation length when a task sets none (lmms-eval's models each pick their own).
DEFAULT_MAX_NEW_TOKENS = 128


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: registers [`SparseMLLMLmms`] as the model `sparse_mllm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.SparseMLLMLmms")


def _none_if_empty(value):
    return None if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")) else value


def _flatten(visuals) -> list:
    out = []
    for visual in visuals or []:
        if isinstance(visual, (list, tuple)):
            out.extend(_flatten(visual))
        elif visual is not None:
            out.append(visual)
    return out


class SparseMLLMLmms(_LmmsBase):
    """
    lmms-eval model for checkpoints trained with `hf_sparse_mllm` (any model an architecture adapter supports),
    evaluated with all visual tokens or with a registered token compressor.

    Args (the `--model_args` of `lmms-eval --model sparse_mllm`):
        pretrained (`str`):
            A saved model folder (weights, config and processor) or a Hub id.
        token_compressor (`str`, *optional*):
            A registered compressor (`divprune`, `pool`, `random`, `redundancy`, `cls_attention`) for compressed
            visual-token inference; leave it out (or `none`) for full tokens.
        keep_ratio (`float`, *optional*):
            Fraction of visual tokens kept per image with `token_compressor`.
        num_keep (`int`, *optional*):
            Visual tokens kept per image with `token_compressor` (overrides `keep_ratio`).
        batch_size (`int`, *optional*, defaults to `1`):
            Prompts per `generate` call (lmms-eval's `--batch_size`).
        device (`str`, *optional*):
            `cuda`, `cpu`, ...; defaults to CUDA when available.
        dtype (`str`, *optional*, defaults to `"auto"`):
            `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        max_new_tokens (`int`, *optional*):
            Generation limit for tasks that set none (defaults to 128).

    Example (needs lmms-eval):

    ```python
    >>> from hf_sparse_mllm.evaluation.lmms_eval_plugin import LMMS_EVAL_AVAILABLE, SparseMLLMLmms
    >>> lm = SparseMLLMLmms.create_from_arg_string(  # doctest: +SKIP
    ...     "pretrained=outputs/demo/sparse_model,token_compressor=divprune,keep_ratio=0.25", {"batch_size": 8})
    ```
    """

    def __init__(
        self,
        pretrained: str,
        token_compressor: str | None = None,
        keep_ratio: float | None = None,
        num_keep: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int | None = None,
        **kwargs,
    ) -> None:
        if not LMMS_EVAL_AVAILABLE:
            raise ImportError(
                "SparseMLLMLmms needs lmms-eval; install it with `make install-lmms-eval` (keeps the CPU torch) or "
                "`pip install 'hf-sparse-mllm[eval]'`."
            )
        if kwargs:
            raise TypeError(
                f"Unknown model_args {sorted(kwargs)} for --model {MODEL_NAME}; expected pretrained, token_compressor, "
                "keep_ratio, num_keep, batch_size, device, dtype, max_new_tokens."
            )
        super().__init__()
        from .evaluator import load_for_evaluation

        self.pretrained = str(pretrained)
        self._model, self.processor = load_for_evaluation(self.pretrained, device=_none_if_empty(device), dtype=dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.token_compressor = _none_if_empty(token_compressor)
        keep_ratio, num_keep = _none_if_empty(keep_ratio), _none_if_empty(num_keep)
        self.keep_ratio = None if keep_ratio is None else float(keep_ratio)
        self.num_keep = None if num_keep is None else int(num_keep)
        # Fails now on an unknown compressor or a bad budget, before lmms-eval builds its requests.
        resolve_compression(self._model, self.token_compressor, self.keep_ratio, self.num_keep)
        if str(batch_size).startswith("auto"):
            raise ValueError(f"--model {MODEL_NAME} needs an integer batch_size, got {batch_size!r}.")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.max_new_tokens = int(max_new_tokens) if _none_if_empty(max_new_tokens) is not None else None
        self._warned_sampling = False

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return next(self._model.parameters()).device

    def _compression(self) -> dict:
        return {"token_compressor": self.token_compressor, "keep_ratio": self.keep_ratio, "num_keep": self.num_keep}

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        return [to_pil(image) for image in _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))]

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
            if not self._warned_sampling:
                warnings.warn(
                    f"--model {MODEL_NAME} decodes greedily; the task's sampling settings are ignored.", stacklevel=2
                )
                self._warned_sampling = True
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)

    def _generate(self, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
        prompts = [render_prompt(self.processor, messages_from_context(c, len(v))) for c, v in zip(contexts, visuals)]
        outputs = generate_from_prompts(
            self._model,
            self.processor,
            prompts,
            visuals,
            max_new_tokens=self._max_new_tokens(gen_kwargs),
            **self._compression(),
        )
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        for stop in until:
            if stop:
                outputs = [output.split(stop)[0] for output in outputs]
        return outputs

    def generate_until(self, requests) -> list[str]:
        from lmms_eval import utils as lmms_utils
        from tqdm.auto import tqdm

        # Per task and generation kwargs, longest prompts first: the built-in evaluator batches the same way.
        collator = lmms_utils.Collator(
            [request.args for request in requests],
            lambda args: length_sort_key(self.tokenizer, args[0]),
            group_fn=lambda args: {**args[1], "__task__": args[4], "__split__": args[5]},
            grouping=True,
        )
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [self._visuals(dtv, t, s, i) for dtv, t, s, i in zip(doc_to_visual, tasks, splits, doc_ids)]
            outputs = self._generate(list(contexts), visuals, dict(all_gen_kwargs[0]))
            results.extend(outputs)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Multi-round generation: after each round the task's `doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)` returns `(visuals, context, terminal, outputs, info)` for the next round."""
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals = [to_pil(v) for v in _flatten(doc_to_visual(doc))]
            outputs, info, round_idx = [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    visuals = [to_pil(v) for v in _flatten(visuals)]
                    if terminal:
                        break
                outputs.append(self._generate([context], [visuals], dict(gen_kwargs))[0])
                round_idx += 1
            results.append(outputs)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            visuals = [to_pil(v) for v in _flatten(doc_to_visual(doc))]
            prompt = render_prompt(self.processor, messages_from_context(context, len(visuals)))
            results.append(
                continuation_logprob(
                    self._model, self.processor, prompt, visuals, str(continuation), **self._compression()
                )
            )
        return results


# ----------------------------------------------------------------------------------------------------------------
# Task functions for lmms-eval YAMLs. A YAML's `!function hf_sparse_mllm.evaluation.lmms_eval_plugin.<name>` falls
# back to importing this module, so exported tasks run the built-in task's own prompt and scoring code.


def _task_functions(name: str) -> dict:
    task = get_task(name)

    def doc_to_visual(doc):
        return task.visuals(doc)

    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        return task.doc_to_text(doc, {**task.prompt_kwargs, **(lmms_eval_specific_kwargs or {})})

    def doc_to_target(doc):
        return task.doc_to_target(doc)

    def process_results(doc, results):
        return task.process_results(doc, results[0].strip())

    functions = {
        f"{name}_doc_to_visual": doc_to_visual,
        f"{name}_doc_to_text": doc_to_text,
        f"{name}_doc_to_target": doc_to_target,
        f"{name}_process_results": process_results,
    }
    for metric, aggregate in task.aggregation.items():
        if aggregate is not mean:
            functions[f"{name}_aggregate_{metric}"] = aggregate
    for function_name, function in functions.items():
        function.__name__ = function.__qualname__ = function_name
    return functions


for _name in list_tasks():
    globals().update(_task_functions(_name))
del _name


class _Function(str):
    """A YAML `!function` reference (lmms-eval imports the named function)."""


def _task_dumper():
    import yaml

    class _TaskDumper(yaml.SafeDumper):
        pass

    _TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
    # Prompts and stop strings with newlines read best double-quoted ("\nAnswer ...").
    _TaskDumper.add_representer(
        str,
        lambda dumper, value: dumper.represent_scalar(
            "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None
        ),
    )
    return _TaskDumper


def export_lmms_eval_task(
    task: Task | str, output_dir: str | os.PathLike, *, task_name: str | None = None, dataset_path: str | None = None
) -> str:
    """
    Write an lmms-eval task YAML that runs a built-in task on a local dataset, with this package's task functions.

    Args:
        task ([`~hf_sparse_mllm.evaluation.tasks.Task`] or `str`):
            A built-in task (name or object from [`~hf_sparse_mllm.evaluation.get_task`]); its prompt kwargs,
            split and generation settings go into the YAML.
        output_dir (`str`):
            Folder for the YAML (pass it to `lmms-eval --include_path`).
        task_name (`str`, *optional*):
            The lmms-eval task name; defaults to `<name>_local` (lmms-eval's own `gqa`, `pope`, ... would shadow a
            task of the same name from `--include_path`).
        dataset_path (`str`, *optional*):
            Overrides the task's dataset: a `save_to_disk` folder (a `DatasetDict` is loaded with lmms-eval's
            `load_from_disk: true`, a single `Dataset` through its arrow files), or a parquet/JSON/JSONL/CSV file.

    Returns:
        `str`: the YAML's path.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_sparse_mllm.data.vqa import build_vqa_dataset
    >>> from hf_sparse_mllm.evaluation.lmms_eval_plugin import export_lmms_eval_task
    >>> data = tempfile.mkdtemp()
    >>> build_vqa_dataset(num_train=0, num_test=4)["test"].save_to_disk(data)
    >>> path = export_lmms_eval_task("sparse_vqa", tempfile.mkdtemp(), dataset_path=data)
    >>> open(path).read().splitlines()[:2]
    ['task: sparse_vqa_local', 'dataset_path: arrow']

    ```
    """
    import yaml

    if isinstance(task, str):
        task = get_task(task)
    if task.name not in list_tasks() or f"{task.name}_process_results" not in globals():
        raise ValueError(f"Only built-in tasks can be exported, got {task.name!r}; built-in tasks: {list_tasks()}.")
    dataset_path = os.fspath(dataset_path or task.dataset_path or "")
    if not dataset_path:
        raise ValueError(f"Task {task.name!r} has no dataset_path; pass dataset_path= (a local dataset).")
    if not os.path.exists(dataset_path):
        raise FileNotFoundError(f"Dataset path {dataset_path!r} does not exist.")
    dataset_path = os.path.abspath(dataset_path)
    task_name = task_name or f"{task.name}_local"
    config: dict = {"task": task_name}
    config["dataset_path"], config["dataset_kwargs"] = lmms_eval_dataset_spec(dataset_path, task.split)
    module = __name__
    config.update(
        {
            "test_split": task.split,
            "output_type": "generate_until",
            "doc_to_visual": _Function(f"{module}.{task.name}_doc_to_visual"),
            "doc_to_text": _Function(f"{module}.{task.name}_doc_to_text"),
            "doc_to_target": _Function(f"{module}.{task.name}_doc_to_target"),
            "process_results": _Function(f"{module}.{task.name}_process_results"),
            "generation_kwargs": {
                "max_new_tokens": task.max_new_tokens,
                "until": list(task.until),
                "temperature": 0,
                "do_sample": False,
                "num_beams": 1,
            },
            "metric_list": [
                {
                    "metric": metric,
                    "aggregation": "mean"
                    if aggregate is mean
                    else _Function(f"{module}.{task.name}_aggregate_{metric}"),
                    "higher_is_better": task.higher_is_better.get(metric, True),
                }
                for metric, aggregate in task.aggregation.items()
            ],
            "lmms_eval_specific_kwargs": {"default": dict(task.prompt_kwargs)},
            "metadata": {"version": task.version},
        }
    )
    text = yaml.dump(config, Dumper=_task_dumper(), sort_keys=False, allow_unicode=True, width=1000)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.fspath(output_dir), f"{task_name}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


__all__ = [
    "LMMS_EVAL_AVAILABLE",
    "MODEL_NAME",
    "SparseMLLMLmms",
    "export_lmms_eval_task",
    "lmms_eval_manifest",
]

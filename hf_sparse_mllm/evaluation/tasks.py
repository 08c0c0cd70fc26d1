"""Evaluation tasks in lmms-eval's shape: a dataset, a prompt template, greedy generation, a metric and its aggregation.

A [`Task`] holds the same pieces as an lmms-eval task YAML: `doc_to_visual`, `doc_to_text` (with `pre_prompt` and
`post_prompt`), `doc_to_target`, `process_results` (per-sample metric values) and one aggregation per metric. The
built-in tasks reproduce lmms-eval's `gqa`, `vqav2_val`, `pope`, `mme` and `scienceqa_img` on local copies of those
datasets (same columns as the lmms-lab Hub datasets), plus `sparse_vqa`, the generated VQA dataset of
[`hf_sparse_mllm.data.vqa`], and `conversational`, which scores the last assistant turn of samples in the training
format (TRL's `images` + `messages`). Tasks are registered in a plain dict; add one with [`register_task`].

```python
>>> from hf_sparse_mllm.evaluation.tasks import get_task, list_tasks
>>> list_tasks()
['conversational', 'gqa', 'mme', 'pope', 'scienceqa_img', 'sparse_vqa', 'vqav2_val']
>>> task = get_task("gqa", dataset_path="path/to/gqa_testdev")
>>> task.prompt({"question": "Is the cat black?"})
'Is the cat black?\\nAnswer the question using a single word or phrase.'

```
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .._names import refuse_taken
from . import metrics
from .generation import messages_from_context, to_pil

logger = logging.get_logger(__name__)

# lmms-eval's post prompt for short-answer benchmarks (GQA, VQAv2, POPE, MME).
SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."
SCIENCEQA_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
# lmms-eval's default `until` for generate_until tasks (a task config's `fewshot_delimiter`).
DEFAULT_UNTIL = ("\n\n",)


def mean_stderr(values: Sequence[float]) -> float | str:
    """Standard error of the mean, as lmms-eval reports it for `mean` aggregations; "N/A" for fewer than 2 values."""
    if len(values) < 2:
        return "N/A"
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def mean(values: Sequence[float]) -> float:
    """lmms-eval's `mean` aggregation."""
    return sum(values) / len(values)


@dataclass
class Task:
    """
    One generation benchmark: where its samples are, how a sample becomes a prompt, and how answers are scored.

    Args:
        name (`str`):
            Task name, the key of the task in `results.json`.
        dataset_path (`str`, *optional*):
            A folder written by `Dataset.save_to_disk`/`DatasetDict.save_to_disk`, a parquet/JSON/JSONL file or a
            folder of them, or a Hub dataset id (needs network). `None` only for tasks with a `default_docs` builder.
        split (`str`, *optional*, defaults to `"test"`):
            Split evaluated when the dataset has several.
        dataset_name (`str`, *optional*):
            Hub dataset configuration (only for Hub ids).
        required_columns (`tuple[str, ...]`, *optional*, defaults to `()`):
            Columns a sample must have; checked before any generation.
        layout (`str`, *optional*, defaults to `""`):
            A description of the expected columns, shown in error messages.
        doc_to_visual (`Callable[[dict], list]`):
            The sample's images (PIL images, `datasets` image dicts, paths or bytes).
        doc_to_text (`Callable[[dict, dict], str]`):
            The prompt text, from the sample and the prompt kwargs (`pre_prompt`, `post_prompt`, ...).
        doc_to_messages (`Callable[[dict, dict], list[dict]]`, *optional*):
            The prompt as conversation turns (TRL's `messages` format), from the sample and the prompt kwargs, as
            lmms-eval's `doc_to_messages`. When set, the prompt is these turns rendered with the processor's chat
            template; otherwise it is one user turn holding the images and `doc_to_text`'s text.
        doc_to_target (`Callable[[dict], Any]`):
            The reference answer, logged with each sample.
        process_results (`Callable[[dict, str], dict]`):
            Per-sample metric values from the sample and the stripped prediction, keyed by metric name.
        aggregation (`dict[str, Callable[[list], float]]`):
            How each metric's per-sample values are reduced; [`mean`] also reports lmms-eval's standard error.
        higher_is_better (`dict[str, bool]`, *optional*):
            Direction of each metric (defaults to `True` for all).
        prompt_kwargs (`dict`, *optional*):
            lmms-eval's `lmms_eval_specific_kwargs["default"]`: `pre_prompt`, `post_prompt` and task-specific keys.
        max_new_tokens (`int`, *optional*, defaults to `16`):
            Generation limit (`generation_kwargs.max_new_tokens` in lmms-eval).
        until (`tuple[str, ...]`, *optional*, defaults to `("\\n\\n",)`):
            Stop strings: the prediction is cut at the first of them.
        validate_docs (`Callable[[Dataset], None]`, *optional*):
            Checks of the values (e.g. POPE answers are yes/no) run before generation; raise `ValueError`.
        default_docs (`Callable[[], Dataset]`, *optional*):
            Builds the samples when `dataset_path` is `None`.
        version (`float`, *optional*, defaults to `0.0`):
            Task version, reported under `versions`.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation import metrics
    >>> from hf_sparse_mllm.evaluation.tasks import Task, mean
    >>> task = Task(
    ...     name="my_vqa",
    ...     dataset_path="my_vqa.jsonl",  # columns: image (a path), question, answer
    ...     required_columns=("image", "question", "answer"),
    ...     doc_to_visual=lambda doc: [doc["image"]],
    ...     doc_to_text=lambda doc, kwargs: kwargs["pre_prompt"] + doc["question"] + kwargs["post_prompt"],
    ...     doc_to_target=lambda doc: doc["answer"],
    ...     process_results=lambda doc, pred: {"exact_match": metrics.exact_match(pred, doc["answer"])},
    ...     aggregation={"exact_match": mean},
    ... )
    >>> task.process_results({"answer": "Red"}, "red.")
    {'exact_match': 1.0}

    ```
    """

    name: str
    doc_to_visual: Callable[[dict], list]
    doc_to_text: Callable[[dict, dict], str]
    doc_to_target: Callable[[dict], Any]
    process_results: Callable[[dict, str], dict]
    aggregation: dict[str, Callable[[list], float]]
    dataset_path: str | None = None
    split: str = "test"
    dataset_name: str | None = None
    required_columns: tuple[str, ...] = ()
    layout: str = ""
    higher_is_better: dict[str, bool] | None = None
    prompt_kwargs: dict = field(default_factory=lambda: {"pre_prompt": "", "post_prompt": ""})
    max_new_tokens: int = 16
    until: tuple[str, ...] = DEFAULT_UNTIL
    validate_docs: Callable | None = None
    default_docs: Callable | None = None
    version: float = 0.0
    doc_to_messages: Callable[[dict, dict], list[dict]] | None = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"A task needs a non-empty name, got {self.name!r}.")
        if not self.aggregation:
            raise ValueError(f"Task {self.name!r} needs at least one metric in `aggregation`.")
        if self.max_new_tokens < 1:
            raise ValueError(f"Task {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.higher_is_better is None:
            self.higher_is_better = dict.fromkeys(self.aggregation, True)
        self.until = tuple(self.until or ())

    @property
    def metric_names(self) -> list[str]:
        return list(self.aggregation)

    def prompt(self, doc: dict) -> str:
        """The prompt text of one sample (`doc_to_text` with this task's prompt kwargs)."""
        return self.doc_to_text(doc, self.prompt_kwargs)

    def messages(self, doc: dict, num_images: int) -> list[dict]:
        """The prompt turns of one sample: `doc_to_messages`, or one user turn with its `num_images` images and
        [`~Task.prompt`] (`<image>` markers in the text place the images)."""
        if self.doc_to_messages is not None:
            return self.doc_to_messages(doc, self.prompt_kwargs)
        return messages_from_context(self.prompt(doc), num_images)

    def visuals(self, doc: dict) -> list:
        """The images of one sample, as RGB PIL images."""
        return [to_pil(image) for image in self.doc_to_visual(doc) if image is not None]

    def postprocess(self, generation: str) -> str:
        """Cut a generation at the first stop string and strip it, as lmms-eval's harness does."""
        for stop in self.until:
            if stop:
                generation = generation.split(stop)[0]
        return generation.strip()

    def aggregate(self, values: dict[str, list]) -> dict[str, Any]:
        """`{"<metric>,none": value, "<metric>_stderr,none": stderr}` for every metric that has values."""
        out = {}
        for metric, aggregate in self.aggregation.items():
            items = values.get(metric, [])
            if not items:
                continue
            out[f"{metric},none"] = aggregate(items)
            out[f"{metric}_stderr,none"] = mean_stderr(items) if aggregate is mean else "N/A"
        return out

    def load(self, limit: int | None = None):
        """Load the samples (a `datasets.Dataset`), keep the first `limit`, and check their columns and values."""
        return self.load_with_size(limit)[0]

    def load_with_size(self, limit: int | None = None):
        """Like [`~Task.load`]; also return the number of samples before `limit`."""
        if self.dataset_path is None:
            if self.default_docs is None:
                raise ValueError(f"Task {self.name!r} needs a dataset_path ({self.layout or 'no layout given'}).")
            docs = self.default_docs()
            source = "the built-in generator"
        else:
            docs = load_docs(self.dataset_path, split=self.split, dataset_name=self.dataset_name)
            source = str(self.dataset_path)
        missing = [c for c in self.required_columns if c not in docs.column_names]
        if missing:
            raise ValueError(
                f"Task {self.name!r} expects columns {list(self.required_columns)} ({self.layout}); the dataset at "
                f"{source} has columns {docs.column_names}, missing {missing}."
            )
        n_original = len(docs)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be a positive number of samples, got {limit}.")
            docs = docs.select(range(min(limit, len(docs))))
        if len(docs) == 0:
            raise ValueError(f"Task {self.name!r}: the dataset at {source} (split {self.split!r}) has no samples.")
        if self.validate_docs is not None:
            try:
                self.validate_docs(docs)
            except ValueError as error:
                raise ValueError(f"Task {self.name!r}, dataset at {source}: {error}") from None
        return docs, n_original

    def _lmms_eval_dataset(self) -> tuple[str | None, dict]:
        if self.dataset_path is None or not os.path.exists(self.dataset_path):
            return self.dataset_path, {}  # a Hub id, or samples built in memory
        return lmms_eval_dataset_spec(self.dataset_path, self.split)

    def to_config(self) -> dict:
        """The task as an lmms-eval task config dict (what `results.json` reports under `configs`)."""
        return {
            "task": self.name,
            **dict(zip(("dataset_path", "dataset_kwargs"), self._lmms_eval_dataset())),
            "dataset_name": self.dataset_name,
            "test_split": self.split,
            "output_type": "generate_until",
            "generation_kwargs": {
                "max_new_tokens": self.max_new_tokens,
                "until": list(self.until),
                "temperature": 0,
                "do_sample": False,
                "num_beams": 1,
            },
            "metric_list": [
                {
                    "metric": metric,
                    "aggregation": "mean" if aggregate is mean else getattr(aggregate, "__name__", str(aggregate)),
                    "higher_is_better": self.higher_is_better.get(metric, True),
                }
                for metric, aggregate in self.aggregation.items()
            ],
            "lmms_eval_specific_kwargs": {"default": dict(self.prompt_kwargs)},
            "metadata": {"version": self.version},
        }


# --------------------------------------------------------------------------------------------------------------------
# Dataset loading


def _is_saved_dataset(path) -> bool:
    if path is None or not os.path.isdir(path):
        return False
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def lmms_eval_dataset_spec(path: str, split: str) -> tuple[str, dict]:
    """The `dataset_path` and `dataset_kwargs` of an lmms-eval task YAML that reads the local dataset at `path`.

    A `DatasetDict` folder uses lmms-eval's `load_from_disk: true` (which expects a `DatasetDict`); a single saved
    `Dataset` is read through its arrow files, and a data file through its `datasets` builder.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return path, {"load_from_disk": True}
    if os.path.isfile(os.path.join(path, "state.json")):
        return "arrow", {"data_files": {split: os.path.join(path, "*.arrow")}}
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is not a save_to_disk dataset folder (no dataset_dict.json or state.json); use a save_to_disk "
            "folder or one parquet/JSON/JSONL/CSV file."
        )
    builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise ValueError(f"Cannot read dataset file {path!r}: use parquet, JSON, JSONL or CSV.")
    return builder, {"data_files": {split: path}}


def load_docs(path: str, split: str = "test", dataset_name: str | None = None):
    """Load one split of a dataset from a `save_to_disk` folder, data files (parquet/JSON/JSONL/CSV) or the Hub.

    Args:
        path (`str`):
            A folder written by `save_to_disk`, a data file, a folder of data files, or a Hub dataset id.
        split (`str`, *optional*, defaults to `"test"`):
            The split to return when the dataset has several (a single-split dataset is returned whatever its name).
        dataset_name (`str`, *optional*):
            Hub configuration name.

    Returns:
        `datasets.Dataset`: the samples.
    """
    import datasets

    path = os.fspath(path)
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
    elif os.path.isfile(path):
        builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(
                f"Cannot read dataset file {path}: use a parquet, JSON, JSONL or CSV file, or a save_to_disk folder."
            )
        loaded = datasets.load_dataset(builder, data_files=path)
    elif os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in _FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(
                f"The dataset folder {path} has neither a save_to_disk dataset (dataset_dict.json or state.json) nor "
                "parquet/JSON/JSONL/CSV files."
            )
        loaded = datasets.load_dataset(path)
    elif _looks_like_hub_id(path):
        try:
            loaded = datasets.load_dataset(path, dataset_name)
        except Exception as error:  # offline, private or misspelt: say which path failed and why
            raise FileNotFoundError(
                f"Dataset path {path!r} is not a local file or folder, and loading it from the Hub failed: {error}"
            ) from error
    else:
        raise FileNotFoundError(f"Dataset path {path!r} does not exist.")
    if isinstance(loaded, datasets.DatasetDict):
        if split in loaded:
            return loaded[split]
        if len(loaded) == 1:
            (name,) = loaded
            logger.warning(f"The dataset at {path} has no split {split!r}; evaluating its only split, {name!r}.")
            return loaded[name]
        raise ValueError(f"The dataset at {path} has no split {split!r}; its splits are {list(loaded)}.")
    return loaded


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (
        len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and os.path.splitext(path)[1] == ""
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Registry

_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Decorator registering a factory `(**overrides) -> Task` under `name`.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.tasks import get_task, register_task
    >>> @register_task("docs_gqa_short")
    ... def gqa_short(**overrides):
    ...     return get_task("gqa", name="docs_gqa_short", max_new_tokens=4, **overrides)
    >>> get_task("docs_gqa_short").max_new_tokens
    4

    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A task name must be a non-empty string, got {name!r}.")

    def decorator(factory):
        refuse_taken(_TASKS, name, factory, kind="Task name", decorator="register_task")
        _TASKS[name] = factory
        return factory

    return decorator


def list_tasks() -> list[str]:
    """Sorted names of the built-in (and registered) tasks."""
    return sorted(name for name in _TASKS if not name.startswith("docs_"))


def get_task(name: str, /, dataset_path: str | None = None, **overrides) -> Task:
    """Build the registered task `name`, reading its samples from `dataset_path`.

    Args:
        name (`str`):
            A name from [`list_tasks`].
        dataset_path (`str`, *optional*):
            Where the samples are (see [`Task`]); `sparse_vqa` generates its test split when it is `None`.
        **overrides:
            [`Task`] fields to change, e.g. `max_new_tokens=8`, `split="val"` or
            `prompt_kwargs={"pre_prompt": "", "post_prompt": ""}`.
    """
    if name not in _TASKS:
        raise ValueError(
            f"Unknown task {name!r}; built-in tasks: {list_tasks()}. Register new ones with @register_task."
        )
    task = _TASKS[name]()
    if dataset_path is not None:
        overrides["dataset_path"] = os.fspath(dataset_path)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Task)}
    if unknown:
        raise TypeError(f"Unknown Task fields {sorted(unknown)} for task {name!r}.")
    if "prompt_kwargs" in overrides:
        overrides["prompt_kwargs"] = {**task.prompt_kwargs, **overrides["prompt_kwargs"]}
    return dataclasses.replace(task, **overrides)


# --------------------------------------------------------------------------------------------------------------------
# Built-in tasks: the same prompts, metrics and aggregations as lmms-eval's task folders of the same names.


def _image_visual(doc: dict) -> list:
    return [] if doc.get("image") is None else [doc["image"]]


def _question_with_prompts(doc: dict, kwargs: dict) -> str:
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _answers_are(values, allowed: tuple[str, ...], column: str = "answer", normalise=str.lower) -> None:
    for index, value in enumerate(values):
        if not isinstance(value, str) or normalise(value.strip()) not in allowed:
            raise ValueError(f"column {column!r} must hold one of {list(allowed)}, got {value!r} in row {index}.")


def _short_answer_task(**fields) -> Task:
    """A question about an image answered in a word or phrase and scored by the mean of one `exact_match` per
    sample: the layout GQA's and VQAv2's lmms-eval YAMLs share, which differ in their columns and their score."""
    return Task(
        doc_to_visual=_image_visual,
        doc_to_text=_question_with_prompts,
        aggregation={"exact_match": mean},
        prompt_kwargs={"pre_prompt": "", "post_prompt": SHORT_ANSWER_POST_PROMPT},
        max_new_tokens=16,
        **fields,
    )


@register_task("gqa")
def _gqa(**overrides) -> Task:
    # lmms_eval/tasks/gqa/gqa.yaml: the registered exact_match metric with ignore_case and ignore_punctuation.
    return _short_answer_task(
        name="gqa",
        split="testdev",
        required_columns=("image", "question", "answer"),
        layout="GQA layout: image, question, answer (lmms-lab GQA testdev_balanced_instructions joined with its images)",
        doc_to_target=lambda doc: doc["answer"],
        process_results=lambda doc, pred: {"exact_match": metrics.exact_match(pred, doc["answer"])},
        **overrides,
    )


def _vqav2_answers(doc: dict) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else a for a in doc["answers"]]


def _vqav2_target(doc: dict):
    return doc.get("answer", _vqav2_answers(doc))


def _vqav2_process_results(doc: dict, pred: str) -> dict:
    return {"exact_match": metrics.vqa_accuracy(pred, _vqav2_answers(doc))}


def _validate_vqav2(docs) -> None:
    for index, answers in enumerate(docs["answers"]):
        if not answers:
            raise ValueError(f"column 'answers' must hold the human answers, got {answers!r} in row {index}.")


@register_task("vqav2_val")
def _vqav2_val(**overrides) -> Task:
    # lmms_eval/tasks/vqav2/vqav2_val.yaml + utils.vqav2_process_results_val.
    return _short_answer_task(
        name="vqav2_val",
        validate_docs=_validate_vqav2,
        split="validation",
        required_columns=("image", "question", "answers"),
        layout="VQAv2 layout: image, question, answers (a list of {'answer': ...} dicts or strings), question_id",
        doc_to_target=_vqav2_target,
        process_results=_vqav2_process_results,
        **overrides,
    )


_POPE_METRICS = {
    "pope_accuracy": "accuracy",
    "pope_precision": "precision",
    "pope_recall": "recall",
    "pope_f1_score": "f1",
    "pope_yes_ratio": "yes_ratio",
}


def _pope_aggregation(key: str) -> Callable[[list], float]:
    def aggregate(items: list[dict]) -> float:
        predictions = [item["prediction"] for item in items]
        return metrics.pope_metrics(predictions, [item["ground_truth"] for item in items])[key]

    aggregate.__name__ = f"pope_aggregate_{key}"
    return aggregate


def _pope_process_results(doc: dict, pred: str) -> dict:
    prediction, truth = pred.lower().strip(), doc["answer"].lower().strip()
    item = {
        "question_id": doc.get("question_id"),
        "score": 1.0 if prediction == truth else 0.0,
        "prediction": prediction,
        "ground_truth": truth,
    }
    return {metric: dict(item) for metric in _POPE_METRICS}


@register_task("pope")
def _pope(**overrides) -> Task:
    # lmms_eval/tasks/pope/pope.yaml + utils.pope_*: the prediction must equal yes/no after lower + strip.
    return Task(
        name="pope",
        required_columns=("image", "question", "answer"),
        layout="POPE layout: image, question, answer ('yes'/'no'), question_id",
        doc_to_visual=_image_visual,
        doc_to_text=lambda doc, kwargs: (
            f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"
        ),
        doc_to_target=lambda doc: doc["answer"],
        process_results=_pope_process_results,
        aggregation={metric: _pope_aggregation(key) for metric, key in _POPE_METRICS.items()},
        prompt_kwargs={"pre_prompt": "", "post_prompt": SHORT_ANSWER_POST_PROMPT},
        max_new_tokens=128,
        validate_docs=lambda docs: _answers_are(docs["answer"], ("yes", "no")),
        **overrides,
    )


_MME_REPLACE_PROMPT = " Please answer yes or no."


def _mme_doc_to_text(doc: dict, kwargs: dict) -> str:
    # lmms_eval/tasks/mme/utils.mme_doc_to_text: a non-empty pre/post prompt replaces MME's own instruction.
    question = doc["question"].strip()
    if kwargs.get("pre_prompt"):
        question = kwargs["pre_prompt"] + question.replace(_MME_REPLACE_PROMPT, "")
    if kwargs.get("post_prompt"):
        question = question.replace(_MME_REPLACE_PROMPT, "") + kwargs["post_prompt"]
    return question


def _mme_process_results(doc: dict, pred: str) -> dict:
    key = "mme_perception_score" if doc["category"] in metrics.MME_PERCEPTION_CATEGORIES else "mme_cognition_score"
    truth = doc["answer"].lower().strip().replace(".", "")
    score = 1.0 if metrics.parse_mme_prediction(pred) == truth else 0.0
    record = {"question_id": doc["question_id"], "category": doc["category"], "score": score}
    return {key: {**record, "prediction": pred, "answer": doc["answer"]}}


def mme_aggregate_perception(items: list[dict]) -> float:
    """Sum over perception categories of acc + acc+ (lmms-eval's `mme_perception_score`)."""
    return metrics.mme_scores(items)["perception"]


def mme_aggregate_cognition(items: list[dict]) -> float:
    """Sum over cognition categories of acc + acc+ (lmms-eval's `mme_cognition_score`)."""
    return metrics.mme_scores(items)["cognition"]


def _validate_mme(docs) -> None:
    _answers_are(docs["answer"], ("yes", "no"), normalise=lambda s: s.lower().replace(".", ""))
    counts = Counter(zip(docs["category"], docs["question_id"]))
    for (category, question_id), count in counts.items():
        if count != 2:
            raise ValueError(
                f"MME scores questions in pairs, but question_id {question_id!r} (category {category!r}) has {count} "
                "question(s); every image needs exactly 2 (evaluate whole images, not a row limit that splits pairs)."
            )


@register_task("mme")
def _mme(**overrides) -> Task:
    # lmms_eval/tasks/mme/mme.yaml + utils.mme_*.
    return Task(
        name="mme",
        required_columns=("image", "question", "answer", "category", "question_id"),
        layout="MME layout: image, question, answer ('Yes'/'No'), category, question_id (the image, two questions each)",
        doc_to_visual=_image_visual,
        doc_to_text=_mme_doc_to_text,
        doc_to_target=lambda doc: doc["answer"],
        process_results=_mme_process_results,
        aggregation={"mme_perception_score": mme_aggregate_perception, "mme_cognition_score": mme_aggregate_cognition},
        prompt_kwargs={"pre_prompt": "", "post_prompt": SHORT_ANSWER_POST_PROMPT},
        validate_docs=_validate_mme,
        **overrides,
    )


def _option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _sqa_doc_to_text(doc: dict, kwargs: dict) -> str:
    # lmms_eval/tasks/scienceqa/utils.sqa_doc_to_text, "default" format.
    context, question, choices = doc["hint"], doc["question"], doc["choices"]
    choices_str = "\n".join(f"{letter}. {choice}" for letter, choice in zip(_option_letters(len(choices)), choices))
    if context:
        context = f"Context: {context}\n"
    return f"{kwargs.get('pre_prompt', '')}{context}{question}\n{choices_str}{kwargs.get('post_prompt', '')}"


def _sqa_target(doc: dict) -> str:
    return _option_letters(len(doc["choices"]))[doc["answer"]]


def _validate_sqa(docs) -> None:
    for index, (answer, choices) in enumerate(zip(docs["answer"], docs["choices"])):
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(
                f"column 'answer' must be the index of the correct choice in [0, {len(choices)}), got {answer!r} "
                f"in row {index}."
            )


@register_task("scienceqa_img")
def _scienceqa_img(**overrides) -> Task:
    # lmms_eval/tasks/scienceqa/scienceqa_img.yaml + utils.sqa_process_results.
    return Task(
        name="scienceqa_img",
        doc_to_visual=_image_visual,
        doc_to_text=_sqa_doc_to_text,
        doc_to_target=_sqa_target,
        process_results=lambda doc, pred: {"exact_match": metrics.scienceqa_match(pred, _sqa_target(doc))},
        aggregation={"exact_match": mean},
        prompt_kwargs={"pre_prompt": "", "post_prompt": SCIENCEQA_POST_PROMPT, "format": "default"},
        required_columns=("image", "question", "choices", "answer", "hint"),
        layout="ScienceQA-IMG layout: image, question, choices (list of str), answer (index of the choice), hint",
        validate_docs=_validate_sqa,
        **overrides,
    )


def _sparse_vqa_doc_to_text(doc: dict, kwargs: dict) -> str:
    # The image goes where the sample's own user turn has it (an `<image>` marker, see `messages_from_context`), so a
    # model is prompted as it was trained: hf_sparse_mllm.data.vqa asks the question before the image by default.
    text = _question_with_prompts(doc, kwargs)
    content = (doc.get("messages") or [{}])[0].get("content")
    types = [item["type"] for item in content] if isinstance(content, list) else []
    return text + "<image>" if types[:1] == ["text"] and types[-1:] == ["image"] else text


def _sparse_vqa_process_results(doc: dict, pred: str) -> dict:
    score = metrics.exact_match(pred, doc["answer"])
    out = {"exact_match": score}
    if doc.get("family"):
        out[f"exact_match_{doc['family']}"] = score
    return out


def sparse_vqa_test_docs(image_size: int = 192, cell_size: int = 16, num_test: int = 1000, seed: int = 0):
    """The generated VQA test split (`sparse_vqa`'s samples when it has no dataset_path), for a model's geometry:
    use its image size and its patch size as the cell size, as the training data was built."""
    from ..data.vqa import build_vqa_dataset

    return build_vqa_dataset(num_train=0, num_test=num_test, image_size=image_size, cell_size=cell_size, seed=seed)[
        "test"
    ]


@register_task("sparse_vqa")
def _sparse_vqa(**overrides) -> Task:
    from ..data.vqa import FAMILIES

    # The prompt is the bare question and the image, in the order of the training conversations of
    # hf_sparse_mllm.data.vqa.
    return Task(
        name="sparse_vqa",
        required_columns=("images", "question", "answer", "family"),
        layout="sparse_vqa layout (hf_sparse_mllm.data.vqa): images (a list), question, answer, family",
        doc_to_visual=lambda doc: list(doc["images"] or []),
        doc_to_text=_sparse_vqa_doc_to_text,
        doc_to_target=lambda doc: doc["answer"],
        process_results=_sparse_vqa_process_results,
        aggregation={"exact_match": mean, **{f"exact_match_{family}": mean for family in FAMILIES}},
        prompt_kwargs={"pre_prompt": "", "post_prompt": ""},
        max_new_tokens=8,
        default_docs=sparse_vqa_test_docs,
        **overrides,
    )


# --------------------------------------------------------------------------------------------------------------------
# conversational: samples in the training format (TRL's `images` + `messages`), scored on their last assistant turn.


def _last_assistant_index(messages) -> int:
    roles = [message.get("role") for message in messages or []]
    if "assistant" not in roles:
        raise ValueError(f"the conversation has no assistant turn to score (roles: {roles})")
    return len(roles) - 1 - roles[::-1].index("assistant")


def _content_text(content, image_marker: str = "") -> str:
    """The text of a message's content (a string or a list of parts); image parts become `image_marker`."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content or []:
        if part.get("type") == "image":
            pieces.append(image_marker)
        elif part.get("type") == "text" and part.get("text"):
            pieces.append(part["text"])
    return "".join(pieces)


def _with_prompts(content, pre_prompt: str, post_prompt: str):
    """A user turn's content with `pre_prompt` before its first text and `post_prompt` after its last one."""
    if not pre_prompt and not post_prompt:
        return content
    if isinstance(content, str):
        return f"{pre_prompt}{content}{post_prompt}"
    parts = [dict(part) for part in content or []]
    texts = [i for i, part in enumerate(parts) if part.get("type") == "text"]
    if not texts:
        return parts + [{"type": "text", "text": f"{pre_prompt}{post_prompt}"}]
    parts[texts[0]]["text"] = pre_prompt + (parts[texts[0]]["text"] or "")
    parts[texts[-1]]["text"] = (parts[texts[-1]]["text"] or "") + post_prompt
    return parts


def _conversational_messages(doc: dict, kwargs: dict) -> list[dict]:
    """The turns before the last assistant turn; the prompt kwargs go around the last user turn's text."""
    turns = [dict(message) for message in doc["messages"][: _last_assistant_index(doc["messages"])]]
    users = [i for i, message in enumerate(turns) if message.get("role") == "user"]
    if users:
        last = turns[users[-1]]
        last["content"] = _with_prompts(last["content"], kwargs.get("pre_prompt", ""), kwargs.get("post_prompt", ""))
    return turns


def _conversational_text(doc: dict, kwargs: dict) -> str:
    # The logged context and the batching order. One user turn reads as lmms-eval's contexts do (`<image>` where its
    # images are); longer conversations get one `role: text` line per turn.
    turns = _conversational_messages(doc, kwargs)
    if len(turns) == 1:
        return _content_text(turns[0]["content"], "<image>")
    return "\n".join(f"{turn.get('role')}: {_content_text(turn['content'], '<image>')}" for turn in turns)


def _conversational_target(doc: dict) -> str:
    return _content_text(doc["messages"][_last_assistant_index(doc["messages"])]["content"])


def _conversational_process_results(doc: dict, pred: str) -> dict:
    target = _conversational_target(doc)
    normalized = metrics.normalize_vqa_answer(pred.strip()) == metrics.normalize_vqa_answer(target)
    return {"exact_match": metrics.exact_match(pred, target), "normalized_match": float(normalized)}


def _validate_conversational(docs) -> None:
    for index, messages in enumerate(docs["messages"]):
        try:
            _last_assistant_index(messages)
        except ValueError as error:
            raise ValueError(f"row {index}: {error}") from None


@dataclass
class ConversationalTask(Task):
    """A [`Task`] on a dataset in the training format: image file paths are read relative to the data file (as the
    training command reads them) and must exist before anything is generated."""

    def load_with_size(self, limit: int | None = None):
        from ..data.conversational import dataset_root, resolve_image_paths

        docs, n_original = super().load_with_size(limit)
        return resolve_image_paths(docs, dataset_root(self.dataset_path)), n_original


@register_task("conversational")
def _conversational(**overrides) -> Task:
    # The prompt is the conversation up to its last assistant turn, rendered with the processor's chat template as
    # in training; the target is that turn's text. `exact_match` is GQA's rule (ignore case and punctuation);
    # `normalized_match` compares the prediction and the target after lmms-eval's VQA answer normalisation
    # (`metrics.normalize_vqa_answer`: punctuation, number words to digits, articles, contractions), one reference.
    return ConversationalTask(
        name="conversational",
        required_columns=("messages",),
        layout="the training format: messages (TRL conversational turns ending with an assistant answer), images",
        doc_to_visual=lambda doc: list(doc.get("images") or []),
        doc_to_text=_conversational_text,
        doc_to_messages=_conversational_messages,
        doc_to_target=_conversational_target,
        process_results=_conversational_process_results,
        aggregation={"exact_match": mean, "normalized_match": mean},
        prompt_kwargs={"pre_prompt": "", "post_prompt": ""},
        max_new_tokens=32,
        validate_docs=_validate_conversational,
        **overrides,
    )


__all__ = [
    "DEFAULT_UNTIL",
    "ConversationalTask",
    "Task",
    "get_task",
    "list_tasks",
    "lmms_eval_dataset_spec",
    "load_docs",
    "mean",
    "mean_stderr",
    "register_task",
    "sparse_vqa_test_docs",
]

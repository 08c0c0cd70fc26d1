"""Scoring with the evaluation package: the harness's accuracies are `sparse_vqa` task results of
[`hf_sparse_mllm.evaluation.evaluate`], so `make demo`, `make bench-accuracy` and `make eval` use one metric.

```python
>>> from benchmarks.harness.scoring import accuracy_by_family
>>> accuracy_by_family({"results": {"sparse_vqa": {"exact_match,none": 0.5, "exact_match_color,none": 1.0}}})
{'overall': 0.5, 'color': 1.0}

```
"""

from __future__ import annotations

import os
from typing import Any

from hf_sparse_mllm.data.vqa import FAMILIES
from hf_sparse_mllm.evaluation import Task, evaluate, get_task

TASK = "sparse_vqa"


def vqa_task(samples) -> Task:
    """The `sparse_vqa` task on `samples` (a split of the harness's generated data) instead of its own test scenes."""
    return get_task(TASK, default_docs=lambda: samples)


def accuracy_by_family(results: dict[str, Any]) -> dict[str, float]:
    """`{"overall": exact match, <family>: exact match, ...}` from a results dict of [`evaluate`] on `sparse_vqa`
    (families without test questions are left out)."""
    metrics = results["results"][TASK]
    accuracy = {"overall": metrics["exact_match,none"]}
    accuracy.update({f: metrics[f"exact_match_{f},none"] for f in FAMILIES if f"exact_match_{f},none" in metrics})
    return accuracy


def score_vqa(
    model,
    processor,
    task: Task,
    *,
    batch_size: int = 100,
    token_compressor: str | None = None,
    keep_ratio: float | None = None,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate `model` on `task` with all visual tokens (or compressed ones); return [`accuracy_by_family`].

    The same call as `evaluate(model, processor, [task], ...)`; with `output_dir` it also writes lmms-eval's
    `results.json` and `samples_sparse_vqa.jsonl` there.
    """
    results = evaluate(
        model,
        processor,
        [task],
        batch_size=batch_size,
        token_compressor=token_compressor,
        keep_ratio=keep_ratio if token_compressor is not None else None,
        limit=limit,
        output_dir=output_dir,
        progress=progress,
    )
    return accuracy_by_family(results)

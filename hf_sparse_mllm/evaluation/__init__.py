"""Evaluation in lmms-eval's shape: batched greedy generation, benchmark metrics, tasks and results files.

```python
>>> from hf_sparse_mllm.evaluation import evaluate, generate_answers, get_task, list_tasks
>>> "sparse_vqa" in list_tasks()
True

```
"""

from .evaluator import (
    add_results_to_model_card,
    evaluate,
    format_comparison_table,
    format_results_table,
    metric_values,
    results_to_eval_results,
    write_results,
)
from .generation import generate_answers, generate_from_prompts
from .tasks import Task, get_task, list_tasks, load_docs, register_task

__all__ = [
    "Task",
    "add_results_to_model_card",
    "evaluate",
    "format_comparison_table",
    "format_results_table",
    "generate_answers",
    "generate_from_prompts",
    "get_task",
    "list_tasks",
    "load_docs",
    "metric_values",
    "register_task",
    "results_to_eval_results",
    "write_results",
]

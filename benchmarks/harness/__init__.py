"""The harness behind `make demo` and `make bench-accuracy`: presets (tiny LLaVA and Qwen2-VL), data, the batched
collator, training runs, scoring with the evaluation package's `sparse_vqa` task, and reports.

```python
>>> from benchmarks.harness import DEMO_PRESETS
>>> sorted(DEMO_PRESETS)
['bench', 'bench-deep', 'bench-deep8', 'bench-qwen2vl', 'default', 'quick']

```
"""

from .collator import VQABatchCollator
from .data import dataset_name, prepare_data
from .presets import DEMO_MODEL, DEMO_PRESETS, DemoConfig, build_model
from .reports import format_report, format_table, time_to_accuracy, time_to_accuracy_sentence, write_plots
from .runs import AccuracyCurveCallback, curve_steps, machine_info, run_demo, train_and_evaluate
from .scoring import accuracy_by_family, score_vqa, vqa_task

__all__ = [
    "DEMO_MODEL",
    "DEMO_PRESETS",
    "AccuracyCurveCallback",
    "DemoConfig",
    "VQABatchCollator",
    "accuracy_by_family",
    "build_model",
    "curve_steps",
    "dataset_name",
    "format_report",
    "format_table",
    "machine_info",
    "prepare_data",
    "run_demo",
    "score_vqa",
    "time_to_accuracy",
    "time_to_accuracy_sentence",
    "train_and_evaluate",
    "vqa_task",
    "write_plots",
]

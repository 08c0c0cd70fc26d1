"""Score generated inputs with lmms-eval's own task code: `python lmms_eval_reference_scores.py cases.json out.json`.

Run by `test_metrics_lmms_eval.py` with an lmms-eval install folder on `PYTHONPATH`. Each task is a real
`ConfigurableTask` built from lmms-eval's own YAML (metric kwargs, `process_results` and aggregations included); only
its dataset is replaced by one in-memory row, so nothing is downloaded. Every prediction goes through the harness's
`ConfigurableTask.process_results` (which strips `generate_until` outputs) exactly as in an evaluation run.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import datasets
import lmms_eval
import lmms_eval.api.metrics  # noqa: F401  (registers `exact_match` and the other built-in metrics)
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.utils import load_yaml_config

TASKS_DIR = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks")


class InMemoryTask(ConfigurableTask):
    """A task from lmms-eval's YAML whose dataset is one given row instead of the Hub dataset."""

    def __init__(self, yaml_file: str, row: dict):
        self._row = row
        config = load_yaml_config(os.path.join(TASKS_DIR, yaml_file))
        # GQA's process_docs joins the Hub image dataset; scoring never looks at images.
        config.pop("process_docs", None)
        super().__init__(config=config)

    def download(self, dataset_kwargs=None) -> None:
        split = self.config.test_split or self.config.validation_split
        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list([self._row])})


def score(task: InMemoryTask, doc: dict, prediction: str) -> dict:
    # process_results may edit the doc (vqav2 normalises its answers in place): give it a copy.
    return task.process_results(copy.deepcopy(doc), [prediction])


def aggregate(task: InMemoryTask, per_doc: list[dict]) -> dict:
    """The evaluator's aggregation: each metric's aggregation over the values of the docs that returned it."""
    out = {}
    for metric, aggregation in task.aggregation().items():
        items = [result[metric] for result in per_doc if metric in result]
        if items:
            out[metric] = float(aggregation(items))
    return out


def main(cases_file: str, out_file: str) -> None:
    cases = json.load(open(cases_file))
    gqa = InMemoryTask("gqa/gqa.yaml", {"question": "q", "answer": "yes"})
    vqa = InMemoryTask("vqav2/vqav2_val.yaml", cases["vqav2"][0]["doc"])
    sqa = InMemoryTask("scienceqa/scienceqa_img.yaml", cases["scienceqa"][0]["doc"])
    pope = InMemoryTask("pope/pope.yaml", cases["pope"][0][0]["doc"])
    mme = InMemoryTask("mme/mme.yaml", cases["mme"][0][0]["doc"])
    parse_mme = mme.config.process_results.__globals__["parse_pred_ans"]

    out = {
        "gqa": [float(score(gqa, case["doc"], case["prediction"])["exact_match"]) for case in cases["gqa"]],
        "vqav2": [float(score(vqa, case["doc"], case["prediction"])["exact_match"]) for case in cases["vqav2"]],
        "scienceqa": [
            float(score(sqa, case["doc"], case["prediction"])["exact_match"]) for case in cases["scienceqa"]
        ],
        "pope": [],
        "mme": [],
    }
    for group in cases["pope"]:
        per_doc = [score(pope, case["doc"], case["prediction"]) for case in group]
        out["pope"].append({"scores": [r["pope_accuracy"]["score"] for r in per_doc], **aggregate(pope, per_doc)})
    for group in cases["mme"]:
        per_doc = [score(mme, case["doc"], case["prediction"]) for case in group]
        labels = [parse_mme(case["prediction"].strip()) for case in group]
        out["mme"].append({"labels": labels, **aggregate(mme, per_doc)})
    json.dump(out, open(out_file, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])

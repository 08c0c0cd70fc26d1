"""lmms-eval itself, with our plugin, gives the numbers of the built-in evaluator (slow: installs lmms-eval from PyPI).

lmms-eval is installed into a temporary folder (`lmms_eval_install`) and runs in a subprocess with that folder on
`PYTHONPATH`; it finds the `sparse_mllm` model through the `lmms_eval.models` entry point of this package, and evaluates
task YAMLs exported by `export_lmms_eval_task` on local datasets, with full and with compressed visual tokens.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import textwrap

import pytest
from lmms_eval_install import install_lmms_eval, lmms_eval_env
from test_evaluation import save_vqa, two_answer_model

from hf_sparse_mllm.evaluation import evaluate, get_task, metric_values
from hf_sparse_mllm.evaluation.lmms_eval_plugin import export_lmms_eval_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lmms_eval_path(tmp_path_factory):
    target = install_lmms_eval(tmp_path_factory.mktemp("lmms_eval_pkgs"))
    # Checked away from the repository root, where a stale `*.egg-info` from an old build could shadow the
    # installed metadata (lmms-eval runs from a temporary folder below for the same reason).
    check = (
        "from importlib.metadata import entry_points; print([e.name for e in entry_points(group='lmms_eval.models')])"
    )
    names = subprocess.run([sys.executable, "-c", check], cwd=target, capture_output=True, text=True).stdout
    assert "sparse_mllm" in names, "the package's entry points are stale: reinstall it with `make install`"
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval_run")
    model, processor = two_answer_model(seed=2)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    from datasets import Dataset, DatasetDict, Value
    from test_evaluation import _image_features, _images

    rows = {"image": _images(12, seed=5), "question": ["is there a cat in the image ?"] * 12}
    rows |= {"answer": ["yes", "no", "no"] * 4, "question_id": [str(i) for i in range(12)]}
    features = _image_features({k: Value("string") for k in ("question", "answer", "question_id")})
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(root / "pope"))
    tasks = [
        get_task("sparse_vqa", dataset_path=save_vqa(root / "vqa", n=30), max_new_tokens=1),
        get_task("pope", dataset_path=str(root / "pope"), max_new_tokens=1),
    ]
    for task in tasks:
        export_lmms_eval_task(task, root / "tasks")
    return root, model, processor, tasks


@pytest.mark.parametrize(
    "compression",
    [{}, {"token_compressor": "divprune", "keep_ratio": 0.5}],
    ids=["full", "divprune"],
)
def test_lmms_eval_matches_builtin_evaluator(lmms_eval_path, setup, compression):
    root, model, processor, tasks = setup
    out = root / f"out_{'_'.join(map(str, compression.values())) or 'full'}"
    model_args = ",".join([f"pretrained={root / 'model'}", *(f"{k}={v}" for k, v in compression.items())])
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "sparse_mllm", "--model_args", model_args,
        "--tasks", "sparse_vqa_local,pope_local", "--include_path", str(root / "tasks"), "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=root, env=lmms_eval_env(lmms_eval_path), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "*" / "*_results.json"))
    theirs = json.load(open(results_file))
    assert theirs["config"]["model_args"] == model_args

    ours = evaluate(model, processor, tasks, batch_size=4, progress=False, **compression)
    for task in tasks:
        their_values = metric_values(theirs)[f"{task.name}_local"]
        our_values = metric_values(ours)[task.name]
        assert set(our_values) <= set(their_values)
        for metric, value in our_values.items():
            assert their_values[metric] == pytest.approx(value, abs=1e-12), (task.name, metric)
            stderr = f"{metric}_stderr,none"
            if ours["results"][task.name][stderr] != "N/A":
                assert theirs["results"][f"{task.name}_local"][stderr] == pytest.approx(
                    ours["results"][task.name][stderr], abs=1e-12
                )
        # Same answer for every sample, not only the same averages.
        (samples_file,) = glob.glob(str(out / "*" / f"*_samples_{task.name}_local.jsonl"))
        their_answers = {}
        for line in open(samples_file):
            record = json.loads(line)
            answer = record["filtered_resps"]
            their_answers[record["doc_id"]] = answer[0] if isinstance(answer, list) else answer
        our_answers = {s["doc_id"]: s["filtered_resps"][0] for s in ours["samples"][task.name]}
        assert their_answers == our_answers
    sparse_vqa = metric_values(ours)["sparse_vqa"]["exact_match"]
    assert 0 < sparse_vqa < 1, "the comparison should cover right and wrong answers"


def test_plugin_loglikelihood_and_multi_round(lmms_eval_path, setup):
    """The plugin's other request types, called the way lmms-eval's evaluator calls them."""
    root, *_ = setup
    script = textwrap.dedent(
        f"""
        import json
        from lmms_eval.api.instance import Instance
        from lmms_eval.models import get_model
        from hf_sparse_mllm.evaluation.generation import continuation_logprob, messages_from_context, render_prompt
        from hf_sparse_mllm.evaluation.lmms_eval_plugin import SparseMLLMLmms
        from datasets import load_from_disk

        cls = get_model("sparse_mllm")
        assert cls is SparseMLLMLmms, cls
        lm = cls.create_from_arg_string("pretrained={root / "model"},token_compressor=pool,keep_ratio=0.25", {{"batch_size": 2}})
        docs = load_from_disk("{root / "vqa"}")
        lm.task_dict = {{"t": docs}}
        visual = lambda doc: doc["images"]
        meta = {{"task": "t", "doc_id": 0, "repeats": 1}}
        ll = lm.loglikelihood([
            Instance("loglikelihood", ("is there a red circle ?", " yes", visual, 0, "t", "test"), 0, meta),
            Instance("loglikelihood", ("is there a red circle ?", lambda doc: "no", visual, 0, "t", "test"), 1, meta),
        ])
        doc = docs["test"][0]
        prompt = render_prompt(lm.processor, messages_from_context("is there a red circle ?", 1))
        expected = continuation_logprob(lm.model, lm.processor, prompt, doc["images"], " yes", token_compressor="pool", keep_ratio=0.25)
        assert abs(ll[0][0] - expected[0]) < 1e-6 and ll[0][1] == expected[1], (ll, expected)
        assert ll[0][1] != ll[1][1]  # the model answers exactly one of yes / no

        def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
            return [doc["images"], "and now ?", round_idx >= 2, previous_output, None]

        gen = {{"max_new_tokens": 1, "until": ["\\n\\n"]}}
        multi = lm.generate_until_multi_round([
            Instance("generate_until_multi_round", ("is there a red circle ?", gen, visual, doc_to_text, 0, "t", "test"), 0, meta)
        ])
        assert len(multi) == 1 and len(multi[0]) == 2 and set(multi[0]) <= {{"yes", "no"}}, multi
        print(json.dumps({{"ll": ll, "multi": multi}}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=lmms_eval_env(lmms_eval_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

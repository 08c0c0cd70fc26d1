"""No silent failures: non-finite steps, steps without trained tokens, crash-safe checkpoints, the isolator on resume."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, tiny_llava, training_args
from transformers import TrainerCallback

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.checkpoints import ISOLATOR_FILE, STATE_FILE
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.skipping import LayerSkipper
from hf_sparse_mllm.trainer import StepPlan

TESTS = Path(__file__).parent
RECIPE = dict(token_compressor="divprune", keep_ratio=0.5, slow_mode_prob=0.0, stage="instruction")


class ParamsPerStep(TrainerCallback):
    """The parameters before and after every optimizer step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step - 1] = [p.detach().clone() for p in model.parameters()]

    def unchanged(self, step):
        return all(torch.equal(a, b) for a, b in zip(self.before[step], self.after[step]))


def _trainer(tmp_path, collator=None, dataset=None, **overrides):
    model, processor = tiny_llava(num_hidden_layers=3)
    config = SparseMLLMConfig(**{**RECIPE, **overrides.pop("recipe", {})})
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=dataset or make_dataset(16),
        data_collator=collator or VisionLanguageCollator(processor),
        sparse_config=config,
    )
    return trainer, processor


def test_an_inf_weight_is_reported_skipped_and_stops_training(tmp_path, caplog):
    trainer, _ = _trainer(
        tmp_path,
        max_steps=6,
        recipe=dict(max_nonfinite_steps=2, layer_skip_policy="fixed", skip_layers=[1], protect_layers=0),
    )
    with torch.no_grad():
        trainer.model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    params = ParamsPerStep()
    trainer.add_callback(params)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        with pytest.raises(RuntimeError, match=r"2 consecutive optimizer steps .*max_nonfinite_steps=2"):
            trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "Non-finite" in r.getMessage()]
    assert len(warnings) == 2
    assert "at step 0 (fast step, skipped layers [1], visual tokens per image 8)" in warnings[0]
    assert "the optimizer step is skipped" in warnings[0]
    assert sum(e.get("sparse/nonfinite_steps", 0) for e in trainer.state.log_history) == 2
    assert params.unchanged(0)  # no optimizer step on it (only the inf weight is not finite: compared as equal)


class NaNOnce:
    """A collator whose second batch has NaN pixels: one non-finite step in an otherwise healthy run."""

    def __init__(self, collator):
        self.collator, self.calls = collator, 0

    def __call__(self, samples):
        batch = self.collator(samples)
        self.calls += 1
        if self.calls == 2:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path):
    _, processor = tiny_llava()
    trainer, _ = _trainer(tmp_path, collator=NaNOnce(VisionLanguageCollator(processor)), max_steps=4)
    params = ParamsPerStep()
    trainer.add_callback(params)
    trainer.train()
    assert trainer.state.global_step == 4
    assert params.unchanged(1) and not params.unchanged(0) and not params.unchanged(2)
    counts = {e["step"]: e.get("sparse/nonfinite_steps", 0) for e in trainer.state.log_history if "loss" in e}
    assert counts == {1: 0, 2: 1, 3: 0, 4: 0}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_step_without_trained_tokens_is_skipped_and_counted(tmp_path, caplog):
    _, processor = tiny_llava()
    collator = VisionLanguageCollator(processor)

    def no_labels_first(samples, calls=[]):  # noqa: B006 (a call counter)
        batch = collator(samples)
        calls.append(1)
        if len(calls) == 1:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch

    trainer, _ = _trainer(tmp_path, collator=no_labels_first, max_steps=2)
    params = ParamsPerStep()
    trainer.add_callback(params)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        trainer.train()
    assert "Step 0 trains no token" in caplog.text
    assert params.unchanged(0) and not params.unchanged(1)
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert logs[1]["sparse/empty_batches"] == 1 and logs[2]["sparse/empty_batches"] == 0
    assert logs[1].get("sparse/nonfinite_steps", 0) == 0


def test_a_nonfinite_redundancy_measurement_measures_again():
    fields = dict(skip_ratio=0.34, max_skip_prob=0.5, protect_layers=1, measure_every=10)
    skipper = LayerSkipper("redundancy", fields, num_layers=4, seed=0)
    decoder = torch.nn.Module()
    decoder.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)])

    def measure(step, hidden):
        with skipper.during_micro_step(StepPlan(step, 0, "fast", (), measuring=True), decoder):
            for layer in decoder.layers:
                hidden = layer(hidden)
        return skipper.finish_measurement(step, lambda values: values)  # one process

    assert skipper.is_measuring_step(0) and not skipper.is_measuring_step(1)
    assert not measure(0, torch.full((1, 3, 8), float("nan")))
    assert skipper.redundancy is None and skipper.is_measuring_step(1)  # not switched off: measured again next step
    restored = LayerSkipper("redundancy", fields, num_layers=4, seed=0)
    restored.load_state_dict(skipper.state_dict())
    assert restored.is_measuring_step(1)
    assert measure(1, torch.randn(1, 3, 8)) and skipper.redundancy == [1.0] * 4 and not skipper.is_measuring_step(2)


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def test_resume_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    trainer, _ = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    out = Path(trainer.args.output_dir)
    assert (out / "checkpoint-4" / STATE_FILE).is_file()
    os.remove(out / "checkpoint-4" / STATE_FILE)  # as a kill before the last file would leave it
    resumed, _ = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        assert resumed._newest_complete_checkpoint() == str(out / "checkpoint-2")
    assert "passed over incomplete checkpoints ['checkpoint-4']" in caplog.text
    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(ValueError, match="found no complete checkpoint"):
        resumed.train(resume_from_checkpoint=True)


def test_a_checkpoint_without_its_isolator_is_refused_unless_restarted(tmp_path, caplog):
    trainer, _ = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    os.remove(checkpoint / ISOLATOR_FILE)
    resumed, _ = _trainer(tmp_path, max_steps=3, save_strategy="no")
    with pytest.raises(ValueError, match="holds no mode isolator.*restart_isolator=True"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed, _ = _trainer(tmp_path, max_steps=3, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        resumed.train(resume_from_checkpoint=str(checkpoint), restart_isolator=True)
    assert "restarts from its initial value" in caplog.text and resumed.state.global_step == 3


@pytest.mark.slow
def test_a_kill_while_saving_resumes_from_the_previous_checkpoint_exactly(tmp_path):
    """A real SIGKILL after the stock files of checkpoint-4 are written, before it is complete (save_total_limit=1,
    so the stock rotation alone would have deleted checkpoint-2 already)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }

    def run(output, *flags):
        cmd = [sys.executable, str(TESTS / "checkpoint_kill_worker.py"), str(tmp_path / output), *flags]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    killed = run("cut", "--kill-at", "4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "cut" / "out"
    assert (out / "checkpoint-2" / STATE_FILE).is_file() and not (out / "checkpoint-4" / STATE_FILE).exists()
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # the stock files were there
    resumed = run("cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "passed over incomplete checkpoints ['checkpoint-4']" in resumed.stderr
    full = run("full")
    assert full.returncode == 0, full.stderr[-3000:]
    a = torch.load(tmp_path / "cut" / "params.pt")
    b = torch.load(tmp_path / "full" / "params.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_resuming_with_another_seed_is_refused_unless_allowed(tmp_path):
    trainer, _ = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = str(Path(trainer.args.output_dir) / "checkpoint-2")
    changed, _ = _trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=3, recipe=dict(seed=7))
    with pytest.raises(ValueError, match=r"seed 42 -> 7 \(checkpoint -> now\).*allow_recipe_change=True"):
        changed.train(resume_from_checkpoint=checkpoint)
    unchanged_fields, _ = _trainer(tmp_path, max_steps=3, save_strategy="no", recipe=dict(max_nonfinite_steps=5))
    unchanged_fields.train(resume_from_checkpoint=checkpoint)  # changes neither a decision nor the loss

    changed, _ = _trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=3, recipe=dict(seed=7))
    changed.train(resume_from_checkpoint=checkpoint, allow_recipe_change=True)
    saved = SparseMLLMConfig.from_pretrained(Path(changed.args.output_dir) / "checkpoint-3")
    assert saved.seed == 7 and saved.resume_note == "at step 2, seed 42 -> 7"
    card = (Path(changed.args.output_dir) / "README.md").read_text()
    assert "The recipe changed when training resumed: at step 2, seed 42 -> 7." in card

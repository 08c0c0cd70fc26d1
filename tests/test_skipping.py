"""Layer Dynamic Skipper: policies, the bypass, trainer integration, determinism across processes and resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAt, collate, make_dataset, tiny_llava, training_args
from transformers import Trainer

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.dualspeed import STREAM_SKIP, step_random
from hf_sparse_mllm.skipping import bypass_layers, get_skip_policy, list_skip_policies, register_skip_policy
from hf_sparse_mllm.skipping.registry import SkipPolicy

LAYERS = 6


def _decide(name, step, redundancy=None, **kwargs):
    """A policy's decision on 8 layers, its fields taken from `kwargs` or the config's defaults."""
    policy, defaults = get_skip_policy(name), SparseMLLMConfig()
    fields = {field: kwargs.get(field, getattr(defaults, field)) for field in policy.fields}
    return policy.decide(step, 8, rng=step_random(0, STREAM_SKIP, step), redundancy=redundancy, **fields)


# ---- policies ----------------------------------------------------------------------------------------------------


def test_registry_lists_and_refuses_duplicates():
    assert list_skip_policies() == ["fixed", "redundancy", "stochastic"]
    with pytest.raises(ValueError, match="already registered"):

        @register_skip_policy("fixed")
        class Again(SkipPolicy):
            pass

    with pytest.raises(ValueError, match=r"Registered policies: \['fixed'"):
        get_skip_policy("nope")


def test_stochastic_protects_ends_and_rises_with_depth():
    counts = Counter()
    for step in range(3000):
        decision = _decide("stochastic", step, max_skip_prob=0.6, protect_layers=2)
        assert decision == _decide("stochastic", step, max_skip_prob=0.6, protect_layers=2)  # pure
        assert list(decision) == sorted(decision)
        counts.update(decision)
    assert set(counts) == {2, 3, 4, 5}  # layers 0, 1, 6, 7 protected
    freq = [counts[layer] / 3000 for layer in (2, 3, 4, 5)]
    assert freq == sorted(freq)
    np.testing.assert_allclose(freq, [0.15, 0.3, 0.45, 0.6], atol=0.04)


def test_redundancy_prefers_redundant_layers_but_trains_all():
    redundancy = [0.1, 0.2, 0.95, 0.3, 0.9, 0.4, 0.93, 0.99]  # layer 7 is protected with protect_layers=1
    assert _decide("redundancy", 0, redundancy=None, skip_ratio=0.25) == ()  # nothing before a measurement
    counts, steps = Counter(), 4000
    for step in range(steps):
        decision = _decide("redundancy", step, redundancy=redundancy, skip_ratio=0.25, max_skip_prob=0.5)
        assert len(decision) == 2 == len(set(decision))
        counts.update(decision)
    assert 0 not in counts and 7 not in counts
    freq = {layer: counts[layer] / steps for layer in range(1, 7)}
    # the most redundant layers are skipped most, but never more than max_skip_prob: every layer keeps training
    assert freq[2] == pytest.approx(0.5, abs=0.03) and freq[6] > freq[4] > freq[5] >= freq[3]
    assert max(freq.values()) <= 0.53
    assert sum(freq.values()) == pytest.approx(2.0)
    # skip_ratio asks for more than the cap allows: the count is clamped to floor(0.5 * 6) = 3
    assert len(_decide("redundancy", 1, redundancy=redundancy, skip_ratio=0.6, max_skip_prob=0.5)) == 3


def test_fixed_policy():
    assert _decide("fixed", 3, skip_layers=[5, 2, 5]) == (2, 5)


# ---- the bypass ----------------------------------------------------------------------------------------------------


def test_skipped_layers_do_not_run_or_get_gradients():
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    model.train()
    batch = collate(processor, make_dataset(2))
    layers = model.model.language_model.layers
    keys = list(model.state_dict())
    calls = Counter()
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: calls.update([i])) for i, layer in enumerate(layers)]
    with bypass_layers(layers, [1, 3]):
        model(**batch).loss.backward()
    for hook in hooks:
        hook.remove()
    assert set(calls) == {0, 2, 4, 5}
    for i, layer in enumerate(layers):
        grads = [p.grad for p in layer.parameters()]
        if i in (1, 3):
            assert all(g is None for g in grads), i
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
    assert list(model.state_dict()) == keys
    assert all("forward" not in vars(layer) for layer in layers)  # restored


def test_bypass_equals_a_model_without_those_layers():
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    batch = collate(processor, make_dataset(2))
    with torch.no_grad(), bypass_layers(model.model.language_model.layers, [2]):
        skipped = model(**batch, use_cache=False).logits
    shallow = copy.deepcopy(model)
    shallow.model.language_model.layers = torch.nn.ModuleList(
        [layer for i, layer in enumerate(shallow.model.language_model.layers) if i != 2]
    )
    shallow.config.text_config.num_hidden_layers = LAYERS - 1
    with torch.no_grad():
        torch.testing.assert_close(skipped, shallow(**batch, use_cache=False).logits)


# ---- trainer integration ---------------------------------------------------------------------------------------


def _grads_after_step(tmp_path, config, activation_checkpointing=False):
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    # transformers 5.19 calls it gradient checkpointing, later 5.x releases activation checkpointing: both work.
    name = (
        "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    )
    args = training_args(tmp_path, **{name: activation_checkpointing})
    trainer = SparseMLLMTrainer(model=model, args=args, sparse_config=config)
    if activation_checkpointing:
        getattr(model, f"{name}_enable")()
        assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    model.train()
    batch = collate(processor, make_dataset(3))
    loss = trainer.training_step(model, batch, num_items_in_batch=(batch["labels"][..., 1:] != -100).sum())
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, trainer


def test_trainer_skips_fixed_layers(tmp_path):
    config = SparseMLLMConfig(
        token_compressor="divprune",
        keep_ratio=0.5,
        slow_mode_prob=0.0,
        stage="instruction",
        layer_skip_policy="fixed",
        skip_layers=[2, 4],
    )
    _, grads, trainer = _grads_after_step(tmp_path, config)
    assert trainer.skipped_layers(0) == (2, 4)
    for name, grad in grads.items():
        if ".layers.2." in name or ".layers.4." in name:
            assert grad is None, name
        elif "language_model.layers" in name:
            assert grad is not None and grad.abs().sum() > 0, name


def test_skipping_off_matches_stock_trainer(tmp_path):
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    batch = collate(processor, make_dataset(3))
    stock_model = copy.deepcopy(model)
    stock = Trainer(model=stock_model, args=training_args(tmp_path))
    n_items = (batch["labels"][..., 1:] != -100).sum()
    stock_loss = stock.training_step(stock_model, dict(batch), num_items_in_batch=n_items).item()
    config = SparseMLLMConfig(token_compressor=None, slow_mode_prob=0.0, layer_skip_policy=None)
    sparse = SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)
    loss = sparse.training_step(model, dict(batch), num_items_in_batch=n_items).item()
    assert loss == pytest.approx(stock_loss, abs=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), stock_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0, msg=name)


def test_activation_checkpointing_matches_with_skipping(tmp_path):
    config = SparseMLLMConfig(
        token_compressor="divprune",
        keep_ratio=0.5,
        slow_mode_prob=0.0,
        stage="instruction",
        layer_skip_policy="fixed",
        skip_layers=[1, 3],
    )
    loss_plain, grads_plain, _ = _grads_after_step(tmp_path, config)
    loss_ckpt, grads_ckpt, _ = _grads_after_step(tmp_path, config, activation_checkpointing=True)
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-5)
    for name, grad in grads_plain.items():
        if grad is None:
            assert grads_ckpt[name] is None, name
        else:
            torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=0, msg=name)


def test_stage_aware_scheduling(tmp_path):
    def trainer_for(freeze_lm, **overrides):
        model, _ = tiny_llava(num_hidden_layers=LAYERS)
        if freeze_lm:
            model.model.language_model.requires_grad_(False)
        config = SparseMLLMConfig(
            token_compressor="divprune",
            slow_mode_prob=0.5,
            layer_skip_policy="stochastic",
            max_skip_prob=0.9,
            **overrides,
        )
        return SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)

    alignment = trainer_for(freeze_lm=True)
    assert alignment.stage == "alignment"
    assert {alignment.step_mode(s) for s in range(50)} == {"fast"}
    assert all(alignment.skipped_layers(s) == () for s in range(50))

    instruction = trainer_for(freeze_lm=False)
    assert instruction.stage == "instruction"
    modes = [instruction.step_mode(s) for s in range(50)]
    assert set(modes) == {"fast", "slow"}
    assert all(instruction.skipped_layers(s) == () for s, m in enumerate(modes) if m == "slow")
    assert any(instruction.skipped_layers(s) for s, m in enumerate(modes) if m == "fast")

    everywhere = trainer_for(freeze_lm=True, stage_aware=False)
    assert any(everywhere.skipped_layers(s) for s in range(50))

    # With skip_on_slow_steps, slow steps draw their skipped layers exactly as fast steps do.
    slow_too = trainer_for(freeze_lm=False, skip_on_slow_steps=True)
    slow_steps = [s for s, m in enumerate(modes) if m == "slow"]
    assert any(slow_too.skipped_layers(s) for s in slow_steps)
    assert all(slow_too.skipped_layers(s) == slow_too.skipped_layers(s, "fast") for s in slow_steps)


def test_slow_step_skips_the_same_layers_for_teacher_and_student(tmp_path):
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    config = SparseMLLMConfig(
        token_compressor="divprune",
        slow_mode_prob=1.0,
        layer_skip_policy="fixed",
        skip_layers=[2, 3],
        skip_on_slow_steps=True,
    )
    trainer = SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)
    runs = Counter()
    hooks = [
        layer.mlp.register_forward_hook(
            lambda *a, i=i: runs.update([i])
        )  # the layer's own hooks run even when skipped
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    trainer.create_optimizer_and_scheduler(1)
    trainer.training_step(trainer.model, collate(processor, make_dataset(2)))
    for hook in hooks:
        hook.remove()
    # Teacher (fast, no grad) and student (all tokens) each ran every layer but the skipped ones, once.
    assert runs == {i: 2 for i in range(LAYERS) if i not in (2, 3)}
    assert all(p.grad is None for i in (2, 3) for p in model.model.language_model.layers[i].parameters())
    assert all(p.grad is not None for p in model.model.language_model.layers[1].parameters())


def test_redundancy_decisions_and_losses_survive_resume(tmp_path):
    config = SparseMLLMConfig(
        token_compressor="divprune",
        keep_ratio=0.5,
        slow_mode_prob=0.2,
        stage="instruction",
        layer_skip_policy="redundancy",
        skip_ratio=0.34,
        measure_every=2,
    )

    def run(output, stop=None, resume=None):
        model, processor = tiny_llava(num_hidden_layers=LAYERS)
        args = training_args(
            tmp_path, output_dir=str(tmp_path / output), max_steps=7, save_strategy="steps", save_steps=3
        )
        trainer = SparseMLLMTrainer(
            model=model,
            args=args,
            train_dataset=make_dataset(28),
            data_collator=VisionLanguageCollator(processor),
            sparse_config=config,
        )
        if stop:
            trainer.add_callback(StopAt(stop))
        trainer.train(resume_from_checkpoint=resume)
        logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
        return trainer, logs

    full, full_logs = run("full")
    run("cut", stop=3)
    resumed, resumed_logs = run("cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert (
        full.layer_skipper.redundancy is not None and resumed.layer_skipper.redundancy == full.layer_skipper.redundancy
    )
    assert any(full_logs[s]["sparse/skipped_layers"] > 0 for s in range(4, 8))
    for step in range(4, 8):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], abs=1e-5)
        assert resumed_logs[step]["sparse/skipped_layers"] == full_logs[step]["sparse/skipped_layers"]
    assert resumed.layer_skipper.skip_counts == full.layer_skipper.skip_counts
    end = [e for e in full.state.log_history if "train_runtime" in e][0]
    assert sum(end[f"sparse/skip_frequency/layer_{i:02d}"] for i in range(LAYERS)) > 0


@pytest.mark.distributed
def test_decisions_identical_across_two_processes(tmp_path):
    tests_dir = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": f"{tests_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(tests_dir / "distributed_skip_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["decisions"] == rank1["decisions"] and len(rank0["decisions"]) == 6
    assert rank0["redundancy"] == rank1["redundancy"] and rank0["redundancy"] is not None
    assert any(d["skip"] for d in rank0["decisions"])


# ---- bad configuration -------------------------------------------------------------------------------------------


def test_skip_on_slow_steps_without_a_policy_warns(caplog):
    with caplog.at_level("WARNING", logger="hf_sparse_mllm.config"):
        SparseMLLMConfig(skip_on_slow_steps=True)
    assert "skip_on_slow_steps=True has no effect without a layer_skip_policy" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_sparse_mllm.config"):
        SparseMLLMConfig(skip_on_slow_steps=True, layer_skip_policy="stochastic")
    assert "skip_on_slow_steps" not in caplog.text


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(layer_skip_policy="drop"), "layer_skip_policy must be one of"),
        (dict(layer_skip_policy="redundancy", skip_ratio=1.0), r"skip_ratio must be in \[0, 1\)"),
        (dict(layer_skip_policy="redundancy", skip_ratio=-0.1), r"skip_ratio must be in \[0, 1\)"),
        (dict(layer_skip_policy="stochastic", max_skip_prob=1.0), r"max_skip_prob must be in \[0, 1\)"),
        (dict(layer_skip_policy="fixed"), "needs skip_layers"),
        (dict(layer_skip_policy="redundancy", measure_every=0), "measure_every"),
    ],
)
def test_bad_skip_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparseMLLMConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(layer_skip_policy="stochastic", protect_layers=4), "protect_layers=4 protects more than"),
        (dict(layer_skip_policy="fixed", skip_layers=[1, 6]), r"skip_layers \[6\] are out of range"),
    ],
)
def test_bad_skip_config_for_model_depth(tmp_path, kwargs, pattern):
    model, _ = tiny_llava(num_hidden_layers=LAYERS)
    with pytest.raises(ValueError, match=pattern):
        SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig(**kwargs))


def test_bypass_restores_an_existing_instance_forward():
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    calls = []
    original = layers[1].forward

    def hooked(*args, **kwargs):  # what accelerate's dispatch hooks install
        calls.append(1)
        return original(*args, **kwargs)

    layers[1].forward = hooked
    with bypass_layers(layers, [1]):
        assert torch.equal(layers[1](torch.ones(1, 2)), torch.ones(1, 2))
    layers[1](torch.ones(1, 2))
    assert calls == [1] and vars(layers[1])["forward"] is hooked


def test_redundancy_measurement_ignores_padding():
    from hf_sparse_mllm.skipping.analysis import analyze_redundancy

    values = []
    for side in ("left", "right"):
        model, processor = tiny_llava(padding_side=side, num_hidden_layers=3)
        values.append(analyze_redundancy(model, [collate(processor, make_dataset(3))]).layer_similarity)
    np.testing.assert_allclose(values[0], values[1], atol=1e-4)


def test_layers_whose_keys_and_values_are_reused_always_run(tmp_path):
    """Gemma 4 with KV sharing: the last layer of each attention type before the shared ones stores keys and values
    that the shared layers read, so no policy skips it and `fixed` refuses to name it."""
    from PIL import Image
    from transformers import Gemma4ForConditionalGeneration

    from hf_sparse_mllm import model_parts
    from hf_sparse_mllm.tiny import build_tiny_model_and_processor

    model, processor = build_tiny_model_and_processor("gemma4", words=["what", "color", "red"], num_hidden_layers=4)
    config = copy.deepcopy(model.config)
    config.text_config.num_kv_shared_layers = 2
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config)
    assert model_parts.kv_store_layers(model) == {0, 1}  # layers 2 and 3 reuse what 0 and 1 store
    sample = {
        "images": [Image.new("RGB", (40, 30), "red")],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
    }

    def trainer(**recipe):
        return SparseMLLMTrainer(
            model=model,
            args=training_args(tmp_path, max_steps=3),
            train_dataset=[sample] * 3,
            data_collator=VisionLanguageCollator(processor),
            sparse_config=SparseMLLMConfig(token_compressor=None, protect_layers=0, **recipe),
        )

    with pytest.raises(ValueError, match=r"skip_layers \[1\] cannot be skipped: later decoder layers reuse"):
        trainer(layer_skip_policy="fixed", skip_layers=[1, 3])
    skipping = trainer(layer_skip_policy="stochastic", max_skip_prob=0.99)
    decisions = [skipping.layer_skipper.decide(step) for step in range(20)]
    assert any(decisions) and not {layer for layers in decisions for layer in layers} & {0, 1}
    skipping.train()  # a skipped storing layer would be a KeyError in the shared layers' attention
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in skipping.state.log_history if "loss" in e)

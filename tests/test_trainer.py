"""SparseMLLMTrainer: equivalence with the stock Trainer, DualSpeed training, checkpoints, resume, bad input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import StopAt, collate, make_dataset, tiny_llava, training_args
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, Trainer

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.dualspeed import SLOW

OFF = dict(token_compressor=None, slow_mode_prob=0.0)


def _loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    n_items = (batch["labels"][..., 1:] != -100).sum()
    loss = trainer.training_step(model, batch, num_items_in_batch=n_items)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sparsity_off_matches_stock_trainer(tmp_path, batch_size, padding_side):
    model, processor = tiny_llava(padding_side)
    batch = collate(processor, make_dataset(batch_size))
    stock_model = copy.deepcopy(model)
    args = training_args(tmp_path)
    stock = Trainer(model=stock_model, args=args)
    sparse = SparseMLLMTrainer(model=model, args=args, sparse_config=SparseMLLMConfig(**OFF))

    stock_loss, stock_grads = _loss_and_grads(stock, stock_model, dict(batch))
    sparse_loss, sparse_grads = _loss_and_grads(sparse, model, dict(batch))

    assert sparse_loss == pytest.approx(stock_loss, abs=1e-5)
    assert stock_grads.keys() == sparse_grads.keys() and len(stock_grads) > 10
    for name, grad in stock_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_keep_all_tokens_without_isolator_matches_stock_loss(tmp_path):
    """The sparse forward itself (span rebuild, hooks, own CE) is exact when it keeps every token."""
    model, processor = tiny_llava("left")
    batch = collate(processor, make_dataset(3))
    stock_model = copy.deepcopy(model)
    stock = Trainer(model=stock_model, args=training_args(tmp_path))
    config = SparseMLLMConfig(token_compressor="divprune", keep_ratio=1.0, num_isolator_tokens=0, slow_mode_prob=0.0)
    sparse = SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)
    stock_loss, stock_grads = _loss_and_grads(stock, stock_model, dict(batch))
    sparse_loss, sparse_grads = _loss_and_grads(sparse, model, dict(batch))
    assert sparse_loss == pytest.approx(stock_loss, abs=1e-5)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def _fresh_checkpoint_keys(tmp_path):
    """Keys a freshly built model writes (transformers maps Llava's module names to its checkpoint layout)."""
    model, _ = tiny_llava()
    model.save_pretrained(tmp_path / "fresh")
    with safe_open(tmp_path / "fresh" / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_dualspeed_training_end_to_end(tmp_path, caplog):
    model, processor = tiny_llava()
    config = SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.1, slow_mode_prob=0.5, stage="instruction")
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=6)
    trainer = SparseMLLMTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(12),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
        sparse_config=config,
    )
    modes = [trainer.step_mode(s) for s in range(6)]
    assert {"fast", "slow"} <= set(modes), modes

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Parameters that get a gradient from an ordinary full-token step are the ones training must change.
    reference = copy.deepcopy(model)
    batch = collate(processor, make_dataset(2))
    reference(**batch).loss.backward()
    should_change = {n for n, p in reference.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    should_change.add("sparse_mllm_isolator.tokens")

    trainer.train()

    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert should_change <= changed, sorted(should_change - changed)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    for key in ("sparse/visual_tokens_per_image", "sparse/seq_len", "sparse/slow_step", "sparse/samples_per_second"):
        assert all(key in entry for entry in logs), key
    slow_logs = [entry for entry, mode in zip(logs, modes) if mode == SLOW]
    assert all({"sparse/teacher_ce", "sparse/student_ce", "sparse/kl"} <= entry.keys() for entry in slow_logs)
    assert [entry["sparse/slow_step"] for entry in logs] == [float(m == SLOW) for m in modes]
    fast = [entry for entry, mode in zip(logs, modes) if mode != SLOW]
    assert all(entry["sparse/visual_tokens_per_image"] == 2 for entry in fast)  # round(0.1 * 16)

    card = (tmp_path / "out" / "README.md").read_text()  # written at the end of training
    assert "divprune" in card and "sparse_mllm" in card
    checkpoint = tmp_path / "out" / "checkpoint-6"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        assert set(f.keys()) == _fresh_checkpoint_keys(tmp_path)
    assert (checkpoint / "sparse_mllm_isolator.safetensors").is_file()
    assert SparseMLLMConfig.from_pretrained(checkpoint).keep_ratio == 0.1

    with caplog.at_level(logging.WARNING):
        reloaded = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    assert not [r for r in caplog.records if "missing" in r.message.lower() or "unexpected" in r.message.lower()]
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], msg=name)


def test_resume_reproduces_modes_and_losses(tmp_path):
    config = SparseMLLMConfig(token_compressor="random", keep_ratio=0.25, slow_mode_prob=0.5, stage="instruction")

    def run(output, max_steps, resume=None):
        model, processor = tiny_llava()
        args = training_args(
            tmp_path, output_dir=str(tmp_path / output), max_steps=6, save_strategy="steps", save_steps=3
        )
        trainer = SparseMLLMTrainer(
            model=model,
            args=args,
            train_dataset=make_dataset(24),
            data_collator=VisionLanguageCollator(processor),
            sparse_config=config,
        )
        if max_steps < 6:  # the same 6-step job, killed after `max_steps` steps
            trainer.add_callback(StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {e["step"]: e for e in trainer.state.log_history if "loss" in e}

    full, full_logs = run("full", 6)
    _, _ = run("interrupted", 3)
    resumed, resumed_logs = run("interrupted", 6, resume=str(tmp_path / "interrupted" / "checkpoint-3"))
    assert sorted(resumed_logs) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's trainer_state.json
    assert {full_logs[s]["sparse/slow_step"] for s in range(1, 7)} == {0.0, 1.0}
    for step in (4, 5, 6):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], abs=1e-5)
        assert resumed_logs[step]["sparse/slow_step"] == full_logs[step]["sparse/slow_step"]
    torch.testing.assert_close(resumed.isolator.tokens, full.isolator.tokens, atol=1e-5, rtol=0)


def test_gradient_accumulation_matches_large_batch(tmp_path):
    samples = make_dataset(4)

    def params_after(batch_size, accumulation):
        model, processor = tiny_llava()
        args = training_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",  # unlike Adam, SGD's update is proportional to the gradient: a mis-scaled loss shows
            learning_rate=0.5,
        )
        trainer = SparseMLLMTrainer(
            model=model,
            args=args,
            train_dataset=samples,
            data_collator=VisionLanguageCollator(processor),
            sparse_config=SparseMLLMConfig(**OFF),
        )
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    big, accumulated = params_after(4, 1), params_after(2, 2)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-4, rtol=0, msg=name)


def test_text_only_batches_train(tmp_path):
    model, processor = tiny_llava()
    samples = make_dataset(2, with_image=False) + make_dataset(2)
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=samples,
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.5, slow_mode_prob=0.0),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_unknown_compressor_lists_registered():
    with pytest.raises(ValueError, match=r"token_compressor must be one of \[.*divprune.*\]"):
        SparseMLLMConfig(token_compressor="nope")


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_keep_ratio_out_of_range(value):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        SparseMLLMConfig(keep_ratio=value)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("slow_mode_prob", 1.5, "slow_mode_prob"),
        ("stage", "pretrain", "stage must be one of"),
        ("num_isolator_tokens", -1, "num_isolator_tokens"),
        ("distill_temperature", 0.0, "distill_temperature"),
        ("num_keep", 0, "num_keep"),
    ],
)
def test_invalid_fields_are_named(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparseMLLMConfig(**{field: value})


def test_misspelt_field_is_an_error_naming_the_field():
    # `PreTrainedConfig` would keep it as an inert attribute: the run would silently use the default instead.
    with pytest.raises(TypeError, match=r"'max_skip_prb' \(did you mean 'max_skip_prob'\?\)"):
        SparseMLLMConfig(layer_skip_policy="stochastic", max_skip_prb=0.3)


def test_num_keep_is_capped_at_each_units_size(tmp_path):
    """Budgets are per visual unit and per batch: `num_keep` above an image's tokens keeps them all."""
    model, processor = tiny_llava()
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(2),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(num_keep=17, slow_mode_prob=0.0),
    )
    trainer.train()
    (log,) = [e for e in trainer.state.log_history if "loss" in e]
    assert log["sparse/visual_tokens_per_image"] == 16


def test_unsupported_model_names_supported_architectures(tmp_path):
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(
        ValueError,
        match=r"no architecture adapter.*llama.*Supported architectures: \[.*'llava'.*register_adapter"
        r".*the base class is enough: hf_sparse_mllm\.adapters\.register_adapter\('llama'\)\(ArchitectureAdapter\)",
    ):
        SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig())


@pytest.mark.parametrize("compressor", [None, "divprune"])
def test_placeholder_mismatch_is_a_clear_error(tmp_path, compressor):
    model, processor = tiny_llava()
    batch = collate(processor, make_dataset(2))
    image_id = model.config.image_token_id
    first = (batch["input_ids"][0] == image_id).nonzero()[0, 0]
    batch["input_ids"][0, first] = processor.tokenizer.convert_tokens_to_ids("red")
    trainer = SparseMLLMTrainer(
        model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig(token_compressor=compressor)
    )
    with pytest.raises(ValueError, match="image placeholder tokens"):
        trainer.training_step(model, batch, num_items_in_batch=None)


# ---- robustness: checkpoints, bad combinations ------------------------------------------------------------------


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    model, processor = tiny_llava()
    args = training_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        learning_rate=5e-3,
    )
    trainer = SparseMLLMTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(8),
        eval_dataset=make_dataset(4),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.5, slow_mode_prob=0.0),
    )
    trainer.train()
    best = LlavaForConditionalGeneration.from_pretrained(trainer.state.best_model_checkpoint)
    for name, tensor in best.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)


def test_sharded_checkpoint_loads_by_module_name(tmp_path):
    from hf_sparse_mllm.compat import load_checkpoint_weights

    model, _ = tiny_llava()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    other, _ = tiny_llava(seed=1)
    result = load_checkpoint_weights(other, str(tmp_path / "sharded"))
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize("compressor", [None, "divprune"])
def test_labels_on_image_tokens_are_masked_and_warned_once(tmp_path, caplog, compressor):
    """A collator that leaves labels on the image placeholders trains exactly as one that masks them."""
    model, processor = tiny_llava()
    masked = collate(processor, make_dataset(2))
    image = masked["input_ids"] == model.config.image_token_id
    unmasked = dict(masked, labels=torch.where(image, masked["input_ids"], masked["labels"]))
    config = SparseMLLMConfig(token_compressor=compressor, slow_mode_prob=0.0)
    trainer = SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        losses = [trainer.training_step(model, dict(batch)).item() for batch in (masked, unmasked, unmasked)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)
    assert len([r for r in caplog.records if "image placeholder tokens" in r.getMessage()]) == 1


def test_custom_losses_are_refused_with_compression(tmp_path):
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match="label_smoothing_factor are not supported"):
        SparseMLLMTrainer(model=model, args=training_args(tmp_path, label_smoothing_factor=0.1))
    SparseMLLMTrainer(
        model=model, args=training_args(tmp_path, label_smoothing_factor=0.1), sparse_config=SparseMLLMConfig(**OFF)
    )


def test_reentrant_checkpointing_under_ddp_is_refused():
    from types import SimpleNamespace

    from hf_sparse_mllm.trainer import _check_training_arguments

    args = SimpleNamespace(
        world_size=2,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
        ddp_static_graph=False,
        label_smoothing_factor=0.0,
    )
    with pytest.raises(ValueError, match="use_reentrant"):
        _check_training_arguments(args, SparseMLLMConfig())
    args.activation_checkpointing_kwargs = {"use_reentrant": False}
    _check_training_arguments(args, SparseMLLMConfig())
    args.ddp_static_graph = True
    with pytest.raises(ValueError, match="ddp_static_graph"):
        _check_training_arguments(args, SparseMLLMConfig(layer_skip_policy="stochastic"))


def test_user_optimizer_without_isolator_is_refused(tmp_path):
    model, processor = tiny_llava()
    optimizer = torch.optim.AdamW(model.parameters())  # built before the trainer attached the isolator
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=make_dataset(4),
        data_collator=VisionLanguageCollator(processor),
        optimizers=(optimizer, None),
    )
    with pytest.raises(ValueError, match="does not hold the mode isolator"):
        trainer.train()


def test_args_are_not_mutated(tmp_path):
    model, _ = tiny_llava()
    args = training_args(tmp_path)
    assert args.ddp_find_unused_parameters is None
    trainer = SparseMLLMTrainer(model=model, args=args)
    assert args.ddp_find_unused_parameters is None and trainer.args.ddp_find_unused_parameters is True


@pytest.mark.parametrize(
    "recipe,warned",
    [
        (dict(token_compressor=None, layer_skip_policy="fixed", skip_layers=[2]), "the decoder layers a step skips"),
        (dict(token_compressor="divprune", slow_mode_prob=0.5), "the mode isolator on slow steps"),
        (dict(token_compressor="divprune", slow_mode_prob=0.0), None),
    ],
)
def test_deepspeed_zero3_with_parameters_left_without_gradient_is_warned(
    tmp_path, caplog, monkeypatch, recipe, warned
):
    """ZeRO-3 re-applies stale gradients to parameters a step does not use (docs/scaling_out.md): never silently."""
    monkeypatch.setattr("hf_sparse_mllm.trainer.is_deepspeed_zero3_enabled", lambda: True)
    model, _ = tiny_llava(num_hidden_layers=4)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm.trainer"):
        SparseMLLMTrainer(
            model=model, args=training_args(tmp_path), sparse_config=SparseMLLMConfig(stage="instruction", **recipe)
        )
    messages = [r.getMessage() for r in caplog.records if "ZeRO-3" in r.getMessage()]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0]

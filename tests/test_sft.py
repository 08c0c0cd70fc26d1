"""`SparseSFTTrainer`: TRL's VLM example with one changed line, LoRA through `peft_config`, equivalence with SFTTrainer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_dataset, tiny_llava
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForImageTextToText
from trl import SFTConfig, SFTTrainer

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer, SparseSFTTrainer

TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
RECIPE = dict(
    token_compressor="divprune",
    keep_ratio=0.25,
    slow_mode_prob=0.5,
    seed=1,  # steps 0-3: fast and slow
    layer_skip_policy="fixed",
    skip_layers=[1],
    protect_layers=0,
)


def sft_config(tmp_path, **overrides) -> SFTConfig:
    """TRL's `sft_vlm.py` arguments, sized for a CPU test (SFTConfig's own defaults otherwise)."""
    defaults = dict(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,  # SFTConfig's default; this CPU has no bfloat16 kernels worth using
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return SFTConfig(**defaults)


def _dataset(n=8):
    return Dataset.from_list(make_dataset(n))


def test_trl_vlm_example_with_one_changed_line(tmp_path):
    model, processor = tiny_llava(num_hidden_layers=3)
    trainer = SparseSFTTrainer(  # was: SFTTrainer(
        model=model,
        args=sft_config(tmp_path),  # gradient_checkpointing=True, as SFTConfig defaults
        train_dataset=_dataset(),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        sparse_config=SparseMLLMConfig(**RECIPE),
    )
    assert isinstance(trainer.model, PeftModel) and trainer.args.gradient_checkpointing
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert all(set(TRL_METRICS) <= e.keys() for e in logs)
    assert all(0 <= e["mean_token_accuracy"] <= 1 and e["entropy"] >= 0 for e in logs)
    num_tokens = [e["num_tokens"] for e in logs]
    assert num_tokens == sorted(num_tokens) and num_tokens[0] > 0
    assert {e["sparse/slow_step"] for e in logs} == {0.0, 1.0}
    fast = [e for e in logs if e["sparse/slow_step"] == 0]  # slow steps run every token and every layer
    assert all(e["sparse/skipped_layers"] == 1 and e["sparse/visual_tokens_per_image"] == 4 for e in fast)


def test_sparsity_off_matches_sft_trainer(tmp_path):
    model, processor = tiny_llava()
    dataset = _dataset(4)
    stock_model = copy.deepcopy(model)
    # assistant_only_loss: TRL's collator then masks the image placeholders too (SFTTrainer would train on them
    # otherwise, which the sparse trainers never do).
    args = sft_config(tmp_path, gradient_checkpointing=False, assistant_only_loss=True)
    stock = SFTTrainer(model=stock_model, args=args, train_dataset=dataset, processing_class=processor)
    sparse = SparseSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        sparse_config=SparseMLLMConfig(token_compressor=None, slow_mode_prob=0.0),
    )
    batch = stock.data_collator([stock.train_dataset[i] for i in range(3)])
    n_items = (batch["labels"][:, 1:] != -100).sum()
    results = []
    for trainer in (stock, sparse):
        trainer.model.train()
        loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items).item()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (stock_loss, stock_grads), (sparse_loss, sparse_grads) = results
    assert sparse_loss == pytest.approx(stock_loss, abs=1e-5)
    assert stock_grads.keys() == sparse_grads.keys() and len(stock_grads) > 10
    for name, grad in stock_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    assert set(TRL_METRICS) <= sparse._metrics["train"].keys()


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_assistant_only_loss_on_and_off_train(tmp_path, assistant_only_loss):
    model, processor = tiny_llava()
    trainer = SparseSFTTrainer(
        model=model,
        args=sft_config(tmp_path, max_steps=2, gradient_checkpointing=False, assistant_only_loss=assistant_only_loss),
        train_dataset=_dataset(4),
        processing_class=processor,
        sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25, slow_mode_prob=0.0),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


@pytest.mark.parametrize("wrap", ["peft_config", "get_peft_model"])
@pytest.mark.parametrize("trainer_cls", [SparseSFTTrainer, SparseMLLMTrainer])
def test_lora_trains_the_adapter_and_the_isolator_only(tmp_path, wrap, trainer_cls):
    from peft import get_peft_model

    from hf_sparse_mllm.data.collator import VisionLanguageCollator

    model, processor = tiny_llava(num_hidden_layers=3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kwargs = {"peft_config": lora} if wrap == "peft_config" else {}
    if wrap == "get_peft_model":
        model = get_peft_model(model, lora)
    if trainer_cls is SparseSFTTrainer:
        kwargs.update(args=sft_config(tmp_path, gradient_checkpointing=False), train_dataset=_dataset())
    else:
        from conftest import training_args

        kwargs.update(
            args=training_args(tmp_path, max_steps=4, output_dir=str(tmp_path / "sft")),
            train_dataset=make_dataset(8),
            data_collator=VisionLanguageCollator(processor),
        )
    trainer = trainer_cls(model=model, processing_class=processor, sparse_config=SparseMLLMConfig(**RECIPE), **kwargs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n or "sparse_mllm_isolator" in n for n in changed), sorted(changed)
    assert any("sparse_mllm_isolator" in n for n in changed) and any("lora_" in n for n in changed)

    trainer.save_model(str(tmp_path / "adapter"))
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k for k in keys), sorted(keys)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base, _ = tiny_llava(num_hidden_layers=3)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)

    trainer.model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    fresh, _ = tiny_llava(num_hidden_layers=3)
    assert set(merged.state_dict()) == set(fresh.state_dict())


@pytest.mark.parametrize(
    "option,pattern",
    [
        (dict(packing=True), "packing=True / padding_free=True cannot be combined"),
        (dict(padding_free=True), "packing=True / padding_free=True cannot be combined"),
        (dict(loss_type="dft"), "loss_type='dft' is not supported with visual token compression"),
    ],
)
def test_sft_options_sparse_steps_cannot_honour_are_clear_errors(tmp_path, option, pattern):
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match=pattern):
        SparseSFTTrainer(
            model=model,
            args=sft_config(tmp_path, **option),
            train_dataset=_dataset(2),
            processing_class=processor,
            sparse_config=SparseMLLMConfig(),
        )


def test_bad_sample_errors_name_the_dataset_index_with_trls_default_columns(tmp_path):
    from PIL import Image

    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.data.samples import index_samples

    model, processor = tiny_llava()
    samples = make_dataset(4)
    samples[2]["images"] = [Image.new("RGB", (32, 32))] * 2  # two images for one image block
    trainer = SparseSFTTrainer(
        model=model,
        args=sft_config(tmp_path, gradient_checkpointing=False),  # remove_unused_columns=True, TRL's default
        train_dataset=index_samples(Dataset.from_list(samples)),
        processing_class=processor,
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(slow_mode_prob=0.0),
    )
    with pytest.raises(ValueError, match="dataset index 2"):
        trainer.train()

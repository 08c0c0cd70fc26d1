"""A compressor and a skip policy registered from outside the package train, validate, parse and describe themselves.

Nothing in `hf_sparse_mllm` names them: the config takes their names and fields from the registries, the trainer
passes each method only its own settings and the model card takes their wording from the methods.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, tiny_llava, training_args
from transformers import HfArgumentParser

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.compressors import (
    TokenCompressor,
    list_compressors,
    register_compressor,
    unregister_compressor,
)
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.hub import render_model_card
from hf_sparse_mllm.skipping import SkipPolicy, list_skip_policies, register_skip_policy, unregister_skip_policy

LAYERS = 4  # the middle layer, 2, is unprotected with protect_layers=1


class FirstTokens(TokenCompressor):
    """Keeps the first `k` tokens of every image and counts its calls."""

    calls: list[tuple[int, int]] = []  # (num_tokens, k) of every selection

    def select(self, features, k, **context):
        type(self).calls.append((features.shape[1], k))
        return torch.arange(k, device=features.device).expand(features.shape[0], k)

    def describe_budget(self, keep_ratio=1.0, num_keep=None):
        return f"keeps the leading {100 * keep_ratio:g} % of each image's tokens (test plug-in)"


class MiddleEveryOtherStep(SkipPolicy):
    """Skips the middle decoder layer on even optimizer steps; reads an existing field, `protect_layers`."""

    fields = ("protect_layers",)

    def decide(self, step, num_layers, *, rng, redundancy, protect_layers):
        return (num_layers // 2,) if step % 2 == 0 else ()

    def validate(self, num_layers=None, *, protect_layers):
        self.check_protection(num_layers, protect_layers)
        if num_layers is not None and not protect_layers <= num_layers // 2 < num_layers - protect_layers:
            raise ValueError(f"middle layer {num_layers // 2} is protected by protect_layers={protect_layers}")

    def describe(self, *, protect_layers):
        return "the middle layer on every other step (test plug-in)"


@pytest.fixture
def plugins():
    """Register both plug-ins for one test; the registries are global, so they are removed afterwards."""
    register_compressor("first_tokens")(FirstTokens)
    register_skip_policy("middle_every_other")(MiddleEveryOtherStep)
    FirstTokens.calls.clear()
    try:
        yield
    finally:
        unregister_compressor("first_tokens")
        unregister_skip_policy("middle_every_other")


def _train(tmp_path, config, steps=4):
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=steps),
        train_dataset=make_dataset(2 * steps),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=config,
    )
    trainer.train()
    return trainer


def test_registered_compressor_trains_and_describes_itself(tmp_path, plugins):
    config = SparseMLLMConfig(token_compressor="first_tokens", keep_ratio=0.25, slow_mode_prob=0.0)
    trainer = _train(tmp_path, config)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(entry["sparse/visual_tokens_per_image"] == 4 for entry in logs)  # 0.25 * 16
    assert FirstTokens.calls and set(FirstTokens.calls) == {(16, 4)}
    wording = "`first_tokens` keeps the leading 25 % of each image's tokens (test plug-in)."
    assert wording in render_model_card(config, model_name="m").text
    assert wording in (tmp_path / "out" / "README.md").read_text()  # the card the trainer wrote


def test_registered_skip_policy_trains_and_describes_itself(tmp_path, plugins):
    config = SparseMLLMConfig(
        token_compressor=None, slow_mode_prob=0.0, stage="instruction", layer_skip_policy="middle_every_other"
    )
    assert config.skip_policy_fields() == {"protect_layers": 1}
    model, processor = tiny_llava(num_hidden_layers=LAYERS)
    attention_calls = [0] * LAYERS
    for index, layer in enumerate(model.model.language_model.layers):
        # A bypassed layer's submodules never run, so their hooks count the steps the layer really ran.
        layer.self_attn.register_forward_hook(
            lambda *_, index=index: attention_calls.__setitem__(index, attention_calls[index] + 1)
        )
    trainer = SparseMLLMTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=make_dataset(8),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=config,
    )
    trainer.train()
    assert [trainer.skipped_layers(step) for step in range(4)] == [(2,), (), (2,), ()]
    assert attention_calls == [4, 4, 2, 4]
    assert trainer.layer_skipper.skip_counts == [0, 0, 2, 0]
    text = render_model_card(config, model_name="m").text
    assert "`middle_every_other` policy (the middle layer on every other step (test plug-in))" in text
    assert "the first and the last decoder layer always run" in text  # it reads protect_layers


def test_registered_skip_policy_validates_its_own_fields(tmp_path, plugins):
    config = SparseMLLMConfig(layer_skip_policy="middle_every_other", protect_layers=2)
    model, _ = tiny_llava(num_hidden_layers=LAYERS)
    with pytest.raises(ValueError, match="protect_layers=2 protects more than the 4 decoder layers can spare"):
        SparseMLLMTrainer(model=model, args=training_args(tmp_path), sparse_config=config)


def test_help_lists_plugins_registered_before_the_parser_is_built(plugins):
    parser = HfArgumentParser(SparseMLLMConfig)
    help_text = " ".join(parser.format_help().split())
    assert "first_tokens" in help_text and "middle_every_other" in help_text
    assert "read by the fixed, middle_every_other, redundancy and stochastic skip policies" in help_text
    (config,) = parser.parse_args_into_dataclasses(["--token_compressor", "first_tokens"])
    assert config.token_compressor == "first_tokens"


def test_unregistering_removes_the_names():
    register_compressor("first_tokens")(FirstTokens)
    register_skip_policy("middle_every_other")(MiddleEveryOtherStep)
    assert isinstance(unregister_compressor("first_tokens"), FirstTokens)
    assert isinstance(unregister_skip_policy("middle_every_other"), MiddleEveryOtherStep)
    assert "first_tokens" not in list_compressors() and "middle_every_other" not in list_skip_policies()
    assert "first_tokens" not in " ".join(HfArgumentParser(SparseMLLMConfig).format_help().split())
    with pytest.raises(ValueError, match="token_compressor must be one of"):
        SparseMLLMConfig(token_compressor="first_tokens")
    with pytest.raises(ValueError, match="Unknown token compressor 'first_tokens'"):
        unregister_compressor("first_tokens")

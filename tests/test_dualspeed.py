"""DualSpeed building blocks: the mode schedule, the isolator's absence from state dicts, the losses."""

import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse_mllm.dualspeed import ModeIsolator, distillation_kl_sum, next_token_targets, step_mode


def test_step_mode_is_a_pure_function_with_the_right_rate():
    modes = [step_mode(seed=7, step=s, slow_mode_prob=0.1) for s in range(4000)]
    assert modes == [step_mode(seed=7, step=s, slow_mode_prob=0.1) for s in range(4000)]
    assert 0.08 < modes.count("slow") / len(modes) < 0.12
    assert modes != [step_mode(seed=8, step=s, slow_mode_prob=0.1) for s in range(4000)]
    assert {step_mode(seed=7, step=s, slow_mode_prob=0.0) for s in range(100)} == {"fast"}
    assert {step_mode(seed=7, step=s, slow_mode_prob=1.0) for s in range(100)} == {"slow"}


def test_isolator_is_trained_but_never_serialised():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("sparse_mllm_isolator", ModeIsolator(3, 4, seed=0))
    assert "sparse_mllm_isolator.tokens" in dict(model.named_parameters())
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias"}
    result = model.load_state_dict(state, strict=True)  # strict load of a base-only state dict succeeds
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(ModeIsolator(3, 4, seed=0).tokens, model.sparse_mllm_isolator.tokens)


def test_next_token_targets_shift():
    labels = torch.tensor([[-100, -100, 5, 6]])
    assert next_token_targets(labels).tolist() == [[-100, 5, 6, -100]]


def test_distillation_kl_matches_definition():
    torch.manual_seed(0)
    student, teacher, t = torch.randn(5, 11), torch.randn(5, 11), 2.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum() * t**2
    torch.testing.assert_close(distillation_kl_sum(student, teacher, t), expected)
    assert distillation_kl_sum(teacher, teacher, t).abs() < 1e-6

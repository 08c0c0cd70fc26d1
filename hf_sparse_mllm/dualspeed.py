"""DualSpeed (arXiv 2602.03815): the fast/slow mode schedule, the mode isolator and the distillation loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAST, SLOW = "fast", "slow"

# Independent random streams derived from (seed, stream, step): adding a new kind of decision never shifts the others.
STREAM_MODE = 1
STREAM_SELECTION = 2
STREAM_SKIP = 3
STREAM_ISOLATOR_INIT = 4


def step_random(seed: int, stream: int, step: int, *extra: int) -> np.random.Generator:
    """A generator that is a pure function of its arguments: the same on every process and after resuming."""
    return np.random.default_rng([seed, stream, step, *extra])


def step_mode(seed: int, step: int, slow_mode_prob: float) -> str:
    """Mode of optimizer step `step`: `"slow"` with probability `slow_mode_prob`, else `"fast"`.

    Example:

    ```python
    >>> from hf_sparse_mllm.dualspeed import step_mode
    >>> [step_mode(seed=0, step=s, slow_mode_prob=0.0) for s in range(3)]
    ['fast', 'fast', 'fast']
    ```
    """
    if slow_mode_prob <= 0:
        return FAST
    return SLOW if step_random(seed, STREAM_MODE, step).random() < slow_mode_prob else FAST


class ModeIsolator(nn.Module):
    """Learnable tokens prepended to every image's kept visual tokens on fast steps.

    The isolator is training state, not part of the model: this module removes its own entries from any parent's
    `state_dict()` (so `save_pretrained`, `push_to_hub` and Trainer checkpoints write exactly the base model's keys)
    and tolerates their absence in `load_state_dict()`. Being a registered submodule of the model, it still reaches
    the optimizer, DDP gradient synchronisation and device placement like any other parameter. The trainer saves it
    separately in each checkpoint.
    """

    STATE_PREFIX = "sparse_mllm_isolator."

    def __init__(self, num_tokens: int, hidden_size: int, seed: int, std: float = 0.02, dtype=None):
        super().__init__()
        rng = step_random(seed, STREAM_ISOLATOR_INIT, 0)
        init = torch.from_numpy(rng.standard_normal((num_tokens, hidden_size)).astype(np.float32)) * std
        self.tokens = nn.Parameter(init.to(dtype) if dtype is not None else init)
        # A plain int: under ZeRO-3 `tokens` is an empty partition until the module's forward gathers it.
        self.num_tokens = num_tokens
        self._register_state_dict_hook(_drop_own_state)
        self.register_load_state_dict_post_hook(_forgive_own_missing_keys)

    def forward(self, features: torch.Tensor, run_lengths: list[int]) -> torch.Tensor:
        """Prepend the isolator tokens to every run of kept visual tokens.

        `features` `(sum(run_lengths), dim)` holds the runs one after another; the result `(sum(run_lengths) +
        len(run_lengths) * num_tokens, dim)` has the isolator tokens before each run. One call and one output tensor
        per forward, so that FSDP and ZeRO-3 gather (and, in backward, reduce) the parameter once.
        """
        tokens = self.tokens.to(features.dtype)
        pieces = []
        for run in torch.split(features, run_lengths):
            pieces += [tokens, run]
        return torch.cat(pieces) if pieces else features


def _drop_own_state(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forgive_own_missing_keys(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ModeIsolator.STATE_PREFIX not in k]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """`labels` shifted left by one: position t is trained to predict `targets[t]` (-100 where nothing is trained)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in float32 over already-gathered answer positions: logits `(P, V)`, targets `(P,)`."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def distillation_kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) at `temperature`, times temperature**2, in float32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    return kl * temperature**2

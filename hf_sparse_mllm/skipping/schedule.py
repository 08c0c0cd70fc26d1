"""`LayerSkipper`: everything layer skipping decides and remembers during training, in one object."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..dualspeed import STREAM_SKIP, step_random
from .bypass import RedundancyMeter, bypass_layers
from .registry import get_skip_policy


class LayerSkipper:
    """Which decoder layers each optimizer step skips, the measurements that decision needs and how often each layer
    was skipped.

    Decisions are a pure function of the seed, the step and the last measured redundancy, so every process takes the
    same ones and a resumed run (with [`~LayerSkipper.load_state_dict`]) takes the ones it would have taken.

    Args:
        policy_name (`str`): a registered skip policy.
        policy_fields (`dict`): the policy's configuration (`SparseMLLMConfig.skip_policy_fields()`).
        num_layers (`int`): decoder depth.
        seed (`int`): seed of the decisions.
        always_run (`frozenset[int]`, *optional*): layers never skipped whatever the policy decides (layers whose
            keys and values later layers reuse, see `model_parts.kv_store_layers`); `skip_layers` naming one is a
            `ValueError`.

    Example:

    ```python
    >>> from hf_sparse_mllm.skipping.schedule import LayerSkipper
    >>> skipper = LayerSkipper("fixed", {"skip_layers": [1], "protect_layers": 1}, num_layers=4, seed=0)
    >>> skipper.decide(step=3), skipper.is_measuring_step(3)
    ((1,), False)

    ```
    """

    def __init__(
        self,
        policy_name: str,
        policy_fields: dict,
        num_layers: int,
        seed: int,
        always_run: frozenset[int] = frozenset(),
    ):
        self.policy = get_skip_policy(policy_name)
        self.fields = dict(policy_fields)
        self.num_layers = num_layers
        self.seed = seed
        self.always_run = frozenset(always_run)
        named = sorted(self.always_run & set(self.fields.get("skip_layers") or ()))
        if named:
            raise ValueError(
                f"skip_layers {named} cannot be skipped: later decoder layers reuse their keys and values (layers "
                f"{sorted(self.always_run)} store them, text_config.num_kv_shared_layers). Drop them from skip_layers."
            )
        self.redundancy: list[float] | None = None  # last measured per-layer input/output similarity
        self.skip_counts = [0] * num_layers  # optimizer steps on which each layer was skipped
        self._counted_step = -1
        self._meter: RedundancyMeter | None = None
        self._meter_step = -1
        self.remeasure = False  # the last measurement was not finite: measure again on the next step

    def is_measuring_step(self, step: int) -> bool:
        if not self.policy.needs_measurement:
            return False
        return self.remeasure or self.policy.is_measuring_step(step, **self.fields)

    def decide(self, step: int) -> tuple[int, ...]:
        """The layers skipped on optimizer step `step` (none on measuring steps)."""
        if self.is_measuring_step(step):
            return ()
        rng = step_random(self.seed, STREAM_SKIP, step)
        layers = self.policy.decide(step, self.num_layers, rng=rng, redundancy=self.redundancy, **self.fields)
        return tuple(layer for layer in layers if layer not in self.always_run)

    @contextlib.contextmanager
    def during_micro_step(self, plan, decoder: nn.Module) -> Iterator[None]:
        """Bypass `plan.skipped_layers` of `decoder.layers` over one micro-batch's forward and backward; with
        `plan.measuring`, also measure (a measurement spans the whole accumulation window)."""
        if plan.step != self._counted_step:  # the histogram counts optimizer steps, not micro-batches
            self._counted_step = plan.step
            for layer in plan.skipped_layers:
                self.skip_counts[layer] += 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(bypass_layers(decoder.layers, plan.skipped_layers))
            if plan.measuring:
                if plan.step != self._meter_step:
                    self._meter, self._meter_step = RedundancyMeter(self.num_layers), plan.step
                stack.enter_context(self._meter.watch(decoder, decoder.layers))
            yield

    def finish_measurement(self, step: int, sum_across_processes: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Turn the measurement of `step` so far into the redundancy the next decisions use; return whether it was
        finite.

        The sums are added over processes first (`sum_across_processes`), so every process holds the same values and
        takes the same decisions. A non-finite measurement keeps the previous redundancy, and the next step measures
        again (so skipping is never switched off for good by one bad batch).
        """
        if self._meter is None or self._meter_step != step:
            return True
        stats = sum_across_processes(torch.tensor(self._meter.sums + self._meter.counts, dtype=torch.float64))
        sums, counts = stats[: self.num_layers], stats[self.num_layers :]
        values = (sums / counts.clamp(min=1)).tolist()
        self.remeasure = not all(math.isfinite(v) for v in values)
        if not self.remeasure:
            self.redundancy = [round(v, 6) for v in values]
        return not self.remeasure

    def skip_frequencies(self, steps: int) -> list[float]:
        """Fraction of `steps` optimizer steps on which each layer was skipped."""
        return [count / max(steps, 1) for count in self.skip_counts]

    def state_dict(self) -> dict:
        return {
            "layer_redundancy": self.redundancy,
            "layer_skip_counts": list(self.skip_counts),
            "remeasure": self.remeasure,
        }

    def load_state_dict(self, state: dict) -> None:
        self.redundancy = state.get("layer_redundancy")
        self.skip_counts = list(state.get("layer_skip_counts") or self.skip_counts)
        self.remeasure = bool(state.get("remeasure", False))

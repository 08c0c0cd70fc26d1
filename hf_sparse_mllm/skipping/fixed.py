"""`fixed`: the same explicit layers on every step (ablations, reproductions, benchmarks)."""

from .registry import SkipPolicy, register_skip_policy


@register_skip_policy("fixed")
class FixedSkipPolicy(SkipPolicy):
    def decide(self, step, num_layers, *, skip_layers=None, **kwargs):
        return tuple(sorted(set(skip_layers or ())))

"""`stochastic`: LayerDrop / stochastic depth with a skip probability that rises linearly with depth."""

import numpy as np

from .registry import SkipPolicy, register_skip_policy


@register_skip_policy("stochastic")
class StochasticSkipPolicy(SkipPolicy):
    """Layer `l` of the skippable range `[p, L - p)` is skipped with probability
    `max_skip_prob * (l - p + 1) / (L - 2p)`: deeper layers, which change the residual stream least, are dropped
    most; the first and last `protect_layers` are never skipped."""

    fields = ("max_skip_prob", "protect_layers")

    def decide(self, step, num_layers, *, rng, redundancy, max_skip_prob, protect_layers):
        layers = self.candidates(num_layers, protect_layers)
        probs = max_skip_prob * np.arange(1, len(layers) + 1) / len(layers)
        return tuple(int(layer) for layer in layers[rng.random(len(layers)) < probs])

    def validate(self, num_layers=None, *, max_skip_prob, protect_layers):
        if max_skip_prob <= 0:
            raise ValueError(
                f"layer_skip_policy='stochastic' with max_skip_prob={max_skip_prob} never skips a layer: "
                "use a max_skip_prob in (0, 1)."
            )
        self.check_protection(num_layers, protect_layers)

    def describe(self, *, max_skip_prob, protect_layers):
        return f"skip probability rising linearly with depth up to {max_skip_prob}"

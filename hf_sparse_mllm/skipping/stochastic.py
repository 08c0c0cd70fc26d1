"""`stochastic`: LayerDrop / stochastic depth with a skip probability that rises linearly with depth."""

import numpy as np

from .registry import SkipPolicy, register_skip_policy


@register_skip_policy("stochastic")
class StochasticSkipPolicy(SkipPolicy):
    """Layer `l` of the skippable range `[p, L - p)` is skipped with probability
    `max_skip_prob * (l - p + 1) / (L - 2p)`: deeper layers, which change the residual stream least, are dropped
    most; the first and last `protect_layers` are never skipped."""

    def decide(self, step, num_layers, *, rng, max_skip_prob=0.5, protect_layers=1, **kwargs):
        layers = self.candidates(num_layers, protect_layers)
        if len(layers) == 0:
            return ()
        probs = max_skip_prob * np.arange(1, len(layers) + 1) / len(layers)
        return tuple(int(layer) for layer in layers[rng.random(len(layers)) < probs])

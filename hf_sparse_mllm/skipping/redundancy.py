"""`redundancy`: skip the layers whose output is most similar to their input (activation-pattern driven, STS)."""

import numpy as np

from .registry import SkipPolicy, register_skip_policy


@register_skip_policy("redundancy")
class RedundancySkipPolicy(SkipPolicy):
    """Every `measure_every` steps the trainer runs a full-depth step that measures each layer's redundancy (cosine
    similarity of its input and output hidden states, averaged over tokens and processes). Other steps skip exactly
    `n = min(round(skip_ratio * num_layers), floor(max_skip_prob * candidates))` unprotected layers.

    Each layer's skip probability grows with its redundancy (weights `exp((r - max r) / temperature)`) but is capped at
    `max_skip_prob`, so every layer still runs, and trains, on at least `1 - max_skip_prob` of the steps; the capped
    probability mass flows to the next most redundant layers (water-filling). Systematic sampling then draws exactly
    `n` layers with exactly those probabilities. Before the first measurement nothing is skipped.
    """

    needs_measurement = True
    temperature = 0.05

    def decide(
        self, step, num_layers, *, rng, redundancy=None, skip_ratio=0.25, max_skip_prob=0.5, protect_layers=1, **kw
    ):
        layers = self.candidates(num_layers, protect_layers)
        count = min(int(round(skip_ratio * num_layers)), int(np.floor(max_skip_prob * len(layers) + 1e-9)))
        if redundancy is None or count <= 0:
            return ()
        scores = np.asarray(redundancy, dtype=np.float64)[layers]
        probs = skip_probabilities(np.exp((scores - scores.max()) / self.temperature), count, max_skip_prob)
        points = rng.random() + np.arange(count)
        # Clamp: float rounding can leave the last cumulative sum a hair below `count`.
        chosen = np.minimum(np.searchsorted(np.cumsum(probs), points, side="right"), len(layers) - 1)
        return tuple(sorted(int(layers[i]) for i in chosen))


def skip_probabilities(weights: np.ndarray, count: int, cap: float) -> np.ndarray:
    """Probabilities proportional to `weights`, each at most `cap`, summing to `count` (needs count <= cap * len)."""
    probs = np.zeros_like(weights)
    capped = np.zeros(len(weights), dtype=bool)
    while True:
        free = ~capped
        scale = (count - cap * capped.sum()) / weights[free].sum()
        probs[free] = weights[free] * scale
        over = free & (probs > cap)
        if not over.any():
            break
        probs[over], capped[over] = cap, True
    return probs

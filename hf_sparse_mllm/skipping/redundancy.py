"""`redundancy`: skip the layers whose output is most similar to their input (activation-pattern driven, STS)."""

import math

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

    fields = ("skip_ratio", "max_skip_prob", "protect_layers", "measure_every")
    needs_measurement = True
    temperature = 0.05

    def decide(self, step, num_layers, *, rng, redundancy, skip_ratio, max_skip_prob, protect_layers, measure_every):
        layers = self.candidates(num_layers, protect_layers)
        count = self.layers_per_step(num_layers, skip_ratio, max_skip_prob, protect_layers)
        if redundancy is None:
            return ()
        scores = np.asarray(redundancy, dtype=np.float64)[layers]
        probs = skip_probabilities(np.exp((scores - scores.max()) / self.temperature), count, max_skip_prob)
        points = rng.random() + np.arange(count)
        # Clamp: float rounding can leave the last cumulative sum a hair below `count`.
        chosen = np.minimum(np.searchsorted(np.cumsum(probs), points, side="right"), len(layers) - 1)
        return tuple(sorted(int(layers[i]) for i in chosen))

    def is_measuring_step(self, step, *, skip_ratio, max_skip_prob, protect_layers, measure_every):
        return step % measure_every == 0

    @staticmethod
    def layers_per_step(num_layers, skip_ratio, max_skip_prob, protect_layers) -> int:
        candidates = max(num_layers - 2 * protect_layers, 0)
        return min(int(round(skip_ratio * num_layers)), math.floor(max_skip_prob * candidates + 1e-9))

    def validate(self, num_layers=None, *, skip_ratio, max_skip_prob, protect_layers, measure_every):
        if skip_ratio <= 0 or max_skip_prob <= 0:
            raise ValueError(
                f"layer_skip_policy='redundancy' with skip_ratio={skip_ratio} and max_skip_prob={max_skip_prob} "
                "never skips a layer: both must be in (0, 1)."
            )
        if num_layers is None:
            return
        self.check_protection(num_layers, protect_layers)
        if self.layers_per_step(num_layers, skip_ratio, max_skip_prob, protect_layers) < 1:
            candidates = num_layers - 2 * protect_layers
            raise ValueError(
                f"layer_skip_policy='redundancy' would never skip a layer of this {num_layers}-layer decoder: it "
                f"skips min(round(skip_ratio * {num_layers}), floor(max_skip_prob * {candidates} unprotected layers)) "
                f"= min({round(skip_ratio * num_layers)}, {math.floor(max_skip_prob * candidates + 1e-9)}) = 0 layers "
                f"a step (skip_ratio={skip_ratio}, max_skip_prob={max_skip_prob}, protect_layers={protect_layers}). "
                "Raise skip_ratio or max_skip_prob."
            )

    def describe(self, *, skip_ratio, max_skip_prob, protect_layers, measure_every):
        return (
            f"up to {100 * skip_ratio:g} % of the layers, the most redundant ones, each on at most "
            f"{100 * max_skip_prob:g} % of the steps, re-measured every {measure_every} steps"
        )


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

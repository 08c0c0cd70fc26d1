"""`fixed`: the same explicit layers on every step (ablations, reproductions, benchmarks)."""

from .registry import SkipPolicy, register_skip_policy


@register_skip_policy("fixed")
class FixedSkipPolicy(SkipPolicy):
    """Skip `skip_layers` on every step that skips. Like every policy it honours `protect_layers`: naming a protected
    layer (one of the first or last `protect_layers`) is an error, so set `protect_layers=0` to skip the ends."""

    fields = ("skip_layers", "protect_layers")

    def decide(self, step, num_layers, *, rng, redundancy, skip_layers, protect_layers):
        return tuple(sorted(set(skip_layers)))

    def validate(self, num_layers=None, *, skip_layers, protect_layers):
        if not skip_layers:
            raise ValueError("layer_skip_policy='fixed' needs skip_layers, a non-empty list of decoder layer indices.")
        if num_layers is None:
            # The first `protect_layers` layers are protected whatever the depth; the last ones need it.
            first = sorted(i for i in set(skip_layers) if i < protect_layers)
            if first:
                raise ValueError(
                    f"skip_layers {first} are protected by protect_layers={protect_layers} (the first and last "
                    f"{protect_layers} decoder layers always run): drop them or set protect_layers=0."
                )
            return
        bad = sorted(i for i in set(skip_layers) if i >= num_layers)
        if bad:
            raise ValueError(
                f"skip_layers {bad} are out of range for a decoder with {num_layers} layers (0..{num_layers - 1})."
            )
        protected = sorted(i for i in set(skip_layers) if i < protect_layers or i >= num_layers - protect_layers)
        if protected:
            raise ValueError(
                f"skip_layers {protected} are protected by protect_layers={protect_layers} (the first and last "
                f"{protect_layers} of {num_layers} layers always run): drop them or set protect_layers=0."
            )

    def describe(self, *, skip_layers, protect_layers):
        return f"layers {sorted(set(skip_layers))}"

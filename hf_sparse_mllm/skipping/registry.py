"""Registry of layer-skip policies.

A policy decides, once per optimizer step, which decoder layers of the language model are not run. Its decision is a
pure function of `(seed, step, measured redundancy)`: every process computes the same set and a resumed run
recomputes the sets it would have used. A new policy is one file: subclass [`SkipPolicy`], name the
[`~hf_sparse_mllm.SparseMLLMConfig`] fields it reads in `fields`, implement `decide` (and, where it has rules of its
own, `validate` and `describe`), decorate it with [`register_skip_policy`]. Nothing else in the package changes:
the trainer passes each policy exactly its fields, the config validates them through the policy and the model card
takes the policy's own wording.

Example:

```python
>>> from hf_sparse_mllm.skipping import get_skip_policy
>>> policy = get_skip_policy("fixed")
>>> policy.fields
('skip_layers', 'protect_layers')
>>> policy.decide(step=0, num_layers=8, rng=None, redundancy=None, skip_layers=[2, 5], protect_layers=1)
(2, 5)

```
"""

from __future__ import annotations

import numpy as np

_POLICIES: dict[str, SkipPolicy] = {}


class SkipPolicy:
    """Base class of layer-skip policies.

    Every method receives the policy's own configuration as keyword arguments: the values of the
    [`~hf_sparse_mllm.SparseMLLMConfig`] fields named in `fields`, and nothing else.

    Attributes:
        name (`str`):
            The name the policy is registered under (`SparseMLLMConfig(layer_skip_policy=name)`).
        fields (`tuple[str, ...]`):
            Names of the `SparseMLLMConfig` fields the policy reads.
        needs_measurement (`bool`):
            Whether `decide` needs the measured per-layer redundancy; the trainer then runs full-depth measuring
            steps where [`~SkipPolicy.is_measuring_step`] says so.
    """

    name: str = ""
    fields: tuple[str, ...] = ()
    needs_measurement: bool = False

    def decide(self, step: int, num_layers: int, *, rng: np.random.Generator, redundancy, **fields) -> tuple[int, ...]:
        """Return the sorted tuple of decoder layer indices skipped on optimizer step `step`.

        Args:
            step (`int`): the optimizer step (`state.global_step`).
            num_layers (`int`): decoder depth.
            rng (`numpy.random.Generator`): derived from the seed and the step; the only randomness allowed.
            redundancy (`list[float]` or `None`): per-layer input/output cosine similarity of the last measurement
                (`None` before the first one, or for policies that do not measure).
            **fields: the policy's configuration.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `decide`.")

    def is_measuring_step(self, step: int, **fields) -> bool:
        """Whether step `step` runs at full depth and measures layer redundancy (policies that need it)."""
        return False

    def validate(self, num_layers: int | None = None, **fields) -> None:
        """Raise a `ValueError` for settings this policy cannot use, or under which it would never skip a layer.

        Called when the config is built (`num_layers=None`) and again by the trainer with the model's decoder depth.
        """

    def describe(self, **fields) -> str:
        """The policy's settings in words, for the model card (e.g. `"layers [2, 5]"`)."""
        return ", ".join(f"{name}={value}" for name, value in fields.items())

    @staticmethod
    def candidates(num_layers: int, protect_layers: int) -> np.ndarray:
        """Layers that may be skipped: all but the first and last `protect_layers`."""
        return np.arange(protect_layers, num_layers - protect_layers)

    @staticmethod
    def check_protection(num_layers: int | None, protect_layers: int) -> None:
        """The rule every built-in policy follows: `protect_layers` must leave at least one layer to skip."""
        if num_layers is not None and num_layers - 2 * protect_layers < 1:
            raise ValueError(
                f"protect_layers={protect_layers} protects more than the {num_layers} decoder layers can spare: "
                f"{num_layers} - 2 * {protect_layers} = {num_layers - 2 * protect_layers} layers would be left to "
                f"skip (use protect_layers <= {(num_layers - 1) // 2})."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fields={self.fields})"


def register_skip_policy(name: str):
    """Class decorator that instantiates a [`SkipPolicy`] subclass and registers it under `name`."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, SkipPolicy)):
            raise TypeError(f"@register_skip_policy({name!r}) decorates SkipPolicy subclasses, got {cls!r}.")
        if name in _POLICIES:
            raise ValueError(
                f"A skip policy named {name!r} is already registered ({type(_POLICIES[name]).__name__}); "
                "register yours under another name."
            )
        cls.name = name
        _POLICIES[name] = cls()
        return cls

    return decorator


def get_skip_policy(name: str) -> SkipPolicy:
    if name not in _POLICIES:
        raise ValueError(f"Unknown layer skip policy {name!r}. Registered policies: {list_skip_policies()}.")
    return _POLICIES[name]


def unregister_skip_policy(name: str) -> SkipPolicy:
    """Remove the policy registered under `name` and return it (e.g. to register a new version of a policy under the
    same name in a notebook, or to clean up after a test)."""
    policy = get_skip_policy(name)
    del _POLICIES[name]
    return policy


def list_skip_policies() -> list[str]:
    return sorted(_POLICIES)

"""Registry of layer-skip policies.

A policy decides, once per optimizer step, which decoder layers of the language model are not run. Its decision is a
pure function of `(seed, step, measured redundancy)`: every process computes the same set and a resumed run
recomputes the sets it would have used. A new policy is one file: subclass [`SkipPolicy`], implement `decide`,
decorate it with [`register_skip_policy`].

Example:

```python
>>> from hf_sparse_mllm.skipping import get_skip_policy
>>> policy = get_skip_policy("fixed")
>>> policy.decide(step=0, num_layers=8, seed=0, skip_layers=[2, 5])
(2, 5)

```
"""

from __future__ import annotations

import numpy as np

_POLICIES: dict[str, SkipPolicy] = {}


class SkipPolicy:
    """Base class. `decide` returns the sorted tuple of layer indices to skip on optimizer step `step`.

    Keyword arguments passed to `decide` (policies take what they need and ignore the rest): `seed`, `skip_ratio`,
    `max_skip_prob`, `protect_layers`, `skip_layers`, `redundancy` (per-layer input/output cosine similarity from the
    last measurement, or `None` before the first one) and `rng` (a `numpy.random.Generator` derived from the seed and
    the step).
    """

    name: str = ""
    # Policies that need a measured redundancy ask the trainer for full-depth measuring steps.
    needs_measurement: bool = False

    def decide(self, step: int, num_layers: int, **kwargs) -> tuple[int, ...]:
        raise NotImplementedError

    @staticmethod
    def candidates(num_layers: int, protect_layers: int) -> np.ndarray:
        """Layers that may be skipped: all but the first and last `protect_layers`."""
        return np.arange(protect_layers, num_layers - protect_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


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


def list_skip_policies() -> list[str]:
    return sorted(_POLICIES)

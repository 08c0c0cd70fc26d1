"""Layer Dynamic Skipper: skip-policy registry, the layer bypass and redundancy measurement."""

from . import fixed, redundancy, stochastic  # noqa: F401  (registration)
from .bypass import bypass_layers, measure_layer_redundancy
from .registry import SkipPolicy, get_skip_policy, list_skip_policies, register_skip_policy

__all__ = [
    "SkipPolicy",
    "bypass_layers",
    "get_skip_policy",
    "list_skip_policies",
    "measure_layer_redundancy",
    "register_skip_policy",
]

"""Layer Dynamic Skipper: skip-policy registry, the layer bypass, redundancy measurement and the training schedule."""

from . import fixed, redundancy, stochastic  # noqa: F401  (registration)
from .bypass import RedundancyMeter, bypass_layers
from .registry import SkipPolicy, get_skip_policy, list_skip_policies, register_skip_policy, unregister_skip_policy
from .schedule import LayerSkipper

__all__ = [
    "LayerSkipper",
    "RedundancyMeter",
    "SkipPolicy",
    "bypass_layers",
    "get_skip_policy",
    "list_skip_policies",
    "register_skip_policy",
    "unregister_skip_policy",
]

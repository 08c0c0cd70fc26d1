"""Visual token compressors: a registry of methods that choose which visual tokens a fast step keeps."""

# Importing a method's module registers it.
from .cls_attention import ClsAttentionCompressor
from .divprune import DivPruneCompressor
from .pool import PoolCompressor
from .random_select import RandomCompressor
from .redundancy import RedundancyCompressor
from .registry import (
    TokenCompressor,
    check_keep_ratio,
    check_num_keep,
    get_compressor,
    list_compressors,
    register_compressor,
    resolve_grid_size,
    unregister_compressor,
)

__all__ = [
    "ClsAttentionCompressor",
    "DivPruneCompressor",
    "PoolCompressor",
    "RandomCompressor",
    "RedundancyCompressor",
    "TokenCompressor",
    "check_keep_ratio",
    "check_num_keep",
    "get_compressor",
    "list_compressors",
    "register_compressor",
    "resolve_grid_size",
    "unregister_compressor",
]

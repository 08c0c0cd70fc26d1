"""Drop the tokens most similar to their spatial neighbours first (our reading of STS's activation-pattern analysis)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TokenCompressor, register_compressor, resolve_grid_size

# Half of the 8-neighbourhood: each unordered neighbour pair is visited once, from its upper/left token.
_HALF_NEIGHBOURHOOD = ((0, 1), (1, 0), (1, 1), (1, -1))


def neighbour_redundancy(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Maximum cosine similarity of each token to its 8 grid neighbours, shape `(num_images, num_tokens)`.

    Args:
        features (`torch.Tensor` of shape `(num_images, num_tokens, dim)`):
            Token features in raster order.
        grid_size (`tuple[int, int]`):
            The `(rows, cols)` patch grid.
    """
    num_images, num_tokens, dim = features.shape
    rows, cols = grid_size
    grid = F.normalize(features, dim=-1).reshape(num_images, rows, cols, dim)
    score = features.new_full((num_images, rows, cols), float("-inf"))
    for dr, dc in _HALF_NEIGHBOURHOOD:
        if dr >= rows or abs(dc) >= cols:
            continue
        # Token (r, c) pairs with (r + dr, c + dc); `a` and `b` are the two ends of every such pair.
        c0, c1 = max(0, -dc), cols - max(0, dc)
        a = (slice(None), slice(0, rows - dr), slice(c0, c1))
        b = (slice(None), slice(dr, rows), slice(c0 + dc, c1 + dc))
        similarity = (grid[a] * grid[b]).sum(dim=-1)
        score[a] = torch.maximum(score[a], similarity)
        score[b] = torch.maximum(score[b], similarity)
    return score.reshape(num_images, num_tokens)


@register_compressor("redundancy")
class RedundancyCompressor(TokenCompressor):
    """Keep the `k` tokens least similar to their spatial neighbours.

    Each token is scored by its maximum cosine similarity to its 8-neighbourhood on the patch grid (diagonals
    included, so a flat background is redundant in every direction). The most redundant tokens (flat background)
    are dropped first; among equal scores the lower index is kept first. Vectorised, O(num_tokens) per image,
    text-agnostic. Needs `grid_size` in the context unless the token count is a perfect square.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import get_compressor
    >>> features = torch.ones(1, 9, 2)  # a flat 3x3 background ...
    >>> features[0, 4] = torch.tensor([1.0, -1.0])  # ... with one distinct token in the middle
    >>> get_compressor("redundancy")(features, 1)
    tensor([[4]])

    ```
    """

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        grid_size = resolve_grid_size(features.shape[1], context.get("grid_size"))
        score = neighbour_redundancy(features, grid_size)
        order = torch.sort(score, dim=1, stable=True).indices
        return order[:, :k].sort(dim=1).values

"""DivPrune: keep a maximally diverse subset of visual tokens (Alvar et al., CVPR 2025; DualSpeed's default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import TokenCompressor, register_compressor


@register_compressor("divprune")
class DivPruneCompressor(TokenCompressor):
    """Greedy max-min diversity selection under cosine distance, batched over images.

    With `D_ij = 1 - cos(x_i, x_j)`, the first kept token is the one whose nearest neighbour is farthest,
    `argmax_i min_{j != i} D_ij`. Then, with `m_j = min_{s selected} D_sj` (distance to the closest kept token),
    the unselected token with the largest `m_j` is added and `m` is updated, until `k` tokens are kept. All images
    run together: one `(num_images, num_tokens, num_tokens)` distance tensor and `k` vectorised argmax steps.
    Ties go to the lowest token index (`torch.argmax` returns the first maximal index). Text-agnostic; needs no
    context. The budget is `round(keep_ratio * num_tokens)` (see [`TokenCompressor.budget`]), not the reference
    code's `int((1 - keep_ratio) * num_tokens)`-style truncation.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import get_compressor
    >>> features = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0]]])
    >>> get_compressor("divprune")(features, 3)  # token 1 nearly duplicates token 0: it is the one dropped
    tensor([[0, 2, 3]])

    ```
    """

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        num_images, num_tokens, _ = features.shape
        unit = F.normalize(features, dim=-1)
        distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)

        eye = torch.eye(num_tokens, dtype=torch.bool, device=features.device)
        nearest = distance.masked_fill(eye, float("inf")).amin(dim=2)  # (B, N): distance to the nearest other token
        current = nearest.argmax(dim=1)  # (B,)

        batch = torch.arange(num_images, device=features.device)
        selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=features.device)
        chosen = torch.empty(num_images, k, dtype=torch.long, device=features.device)
        min_distance = torch.full((num_images, num_tokens), float("inf"), device=features.device)
        for step in range(k):
            if step > 0:
                current = min_distance.masked_fill(selected, float("-inf")).argmax(dim=1)
            chosen[:, step] = current
            selected[batch, current] = True
            min_distance = torch.minimum(min_distance, distance[batch, current])
        return chosen.sort(dim=1).values

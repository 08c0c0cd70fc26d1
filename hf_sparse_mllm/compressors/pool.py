"""Average pooling on the 2-D patch grid: the parameter-free baseline (e.g. 2x2 stride 2: 576 -> 144 tokens)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import (
    TokenCompressor,
    register_compressor,
    resolve_grid_size,
)


def pool_window(rows: int, cols: int, k: int) -> tuple[int, int] | None:
    """The `(window_rows, window_cols)` pooling window (stride = window, ceil mode) that turns the grid into `k` cells.

    Square `s x s` windows come first, with the smallest stride `s` that gives `k` cells (the most even windows;
    edge windows may be partial). Otherwise a rectangular window that tiles the grid exactly, the one closest to
    square. `None` when `k` cells cannot be made.
    """
    for s in range(1, max(rows, cols) + 1):
        if math.ceil(rows / s) * math.ceil(cols / s) == k:
            return min(s, rows), min(s, cols)
    best, best_key = None, None
    for h in range(1, rows + 1):
        if rows % h or k % h or cols % (k // h):
            continue
        window = (rows // h, cols // (k // h))
        key = (abs(math.log(window[0] / window[1])), -h)
        if best_key is None or key < best_key:
            best, best_key = window, key
    return best


def pool_stride(keep_ratio: float) -> int:
    """The square pooling stride a `keep_ratio` asks for: `s = max(1, round(sqrt(1 / keep_ratio)))`."""
    return max(1, round(math.sqrt(1 / keep_ratio)))


def valid_pool_budgets(rows: int, cols: int) -> list[int]:
    """Every number of tokens that pooling a `rows x cols` grid can produce."""
    budgets = {math.ceil(rows / s) * math.ceil(cols / s) for s in range(1, max(rows, cols) + 1)}
    budgets |= {h * w for h in range(1, rows + 1) if rows % h == 0 for w in range(1, cols + 1) if cols % w == 0}
    return sorted(budgets)


@register_compressor("pool")
class PoolCompressor(TokenCompressor):
    """Average pooling of the projected features on the `(rows, cols)` patch grid.

    `compress` returns the pooled features (`torch.nn.functional.avg_pool2d` with stride equal to the window and
    `ceil_mode=True`, so partial edge windows average the patches they cover); the kept "tokens" are new averaged
    vectors, not a subset. `select` (calling the compressor) returns one index per output cell, the top-left patch of
    its window, which is also the position a pooled token takes in an M-RoPE model. Only budgets that form a pooled grid are achievable: from
    `keep_ratio`, the stride is `s = max(1, round(sqrt(1 / keep_ratio)))` and `k = ceil(rows / s) * ceil(cols / s)`
    (keep_ratio=0.25 on 24x24 -> 144); an explicit `num_keep` must be such a grid (see [`pool_window`]), otherwise
    `ValueError` lists the valid budgets. Needs `grid_size` in the context unless the token count is a perfect square.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import get_compressor
    >>> pool = get_compressor("pool")
    >>> features = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, one channel
    >>> k = pool.budget(num_tokens=16, keep_ratio=0.25)
    >>> pool.compress(features, k).flatten().tolist()
    [2.5, 4.5, 10.5, 12.5]
    >>> pool(features, k)
    tensor([[ 0,  2,  8, 10]])

    ```
    """

    selects = False

    def budget_from_ratio(self, num_tokens: int, keep_ratio: float, grid_size: tuple[int, int] | None) -> int:
        rows, cols = resolve_grid_size(num_tokens, grid_size)
        stride = pool_stride(keep_ratio)
        return math.ceil(rows / stride) * math.ceil(cols / stride)

    def check_achievable(self, num_keep: int, num_tokens: int, grid_size: tuple[int, int] | None) -> None:
        self._window(*resolve_grid_size(num_tokens, grid_size), num_keep, argument="num_keep")

    def describe_budget(self, keep_ratio: float = 1.0, num_keep: int | None = None) -> str:
        """The stride-based budget in words (see [`~PoolCompressor.budget`]).

        Example:

        ```python
        >>> from hf_sparse_mllm.compressors import get_compressor
        >>> text = get_compressor("pool").describe_budget(keep_ratio=0.25)
        >>> text[:64]
        "averages each 2x2 window of an image's patch grid into one token"
        >>> "ceil(rows / 2) * ceil(cols / 2) tokens" in text
        True

        ```
        """
        if num_keep is not None:
            return (
                f"averages each image's patch grid into {num_keep} tokens, one per pooling window (an image with at "
                "most that many tokens keeps them all)"
            )
        stride = pool_stride(keep_ratio)
        formula = f"s = max(1, round(sqrt(1 / {keep_ratio}))) = {stride}"
        if stride == 1:
            return f"keeps every visual token: keep_ratio={keep_ratio} gives a pooling stride of 1 ({formula})"
        return (
            f"averages each {stride}x{stride} window of an image's patch grid into one token (stride {formula}, so a "
            f"rows x cols grid keeps ceil(rows / {stride}) * ceil(cols / {stride}) tokens: {100 / stride**2:.3g} % of "
            f"a grid whose sides are multiples of {stride})"
        )

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        rows, cols = resolve_grid_size(features.shape[1], context.get("grid_size"))
        window_rows, window_cols = self._window(rows, cols, k)
        top = torch.arange(0, rows, window_rows, device=features.device)
        left = torch.arange(0, cols, window_cols, device=features.device)
        indices = (top[:, None] * cols + left[None, :]).flatten()
        return indices.expand(features.shape[0], k)

    def compress_with_indices(
        self, features: torch.Tensor, k: int, **context
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        indices = self(features, k, **context)
        num_images, num_tokens, dim = features.shape
        if k == num_tokens or num_images == 0:
            return indices, torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, dim))
        rows, cols = resolve_grid_size(num_tokens, context.get("grid_size"))
        window = self._window(rows, cols, k)
        grid = features.transpose(1, 2).reshape(num_images, dim, rows, cols)
        pooled = F.avg_pool2d(grid, kernel_size=window, stride=window, ceil_mode=True)
        return indices, pooled.flatten(2).transpose(1, 2)

    def _window(self, rows: int, cols: int, k: int, argument: str = "k") -> tuple[int, int]:
        window = pool_window(rows, cols, k)
        if window is None:
            raise ValueError(
                f"The pool compressor cannot make {argument}={k} tokens from a {rows}x{cols} patch grid; "
                f"valid budgets are {valid_pool_budgets(rows, cols)}."
            )
        return window

"""Registry of visual token compressors and their common base class.

A compressor picks, for every image, which of its `num_tokens` projected visual tokens survive on a fast step. A new
method is one file with one class: subclass [`TokenCompressor`], implement `select`, decorate it with
[`register_compressor`]; a method whose budget is not `round(keep_ratio * num_tokens)` also overrides `budget` and
`describe_budget` (the model card's wording). The registry is a plain module-level dict.

Example:

```python
>>> import torch
>>> from hf_sparse_mllm.compressors import get_compressor
>>> compressor = get_compressor("divprune")
>>> k = compressor.budget(num_tokens=16, keep_ratio=0.25)
>>> k
4
>>> features = torch.randn(2, 16, 8, requires_grad=True)  # (num_images, num_tokens, dim)
>>> compressor(features, k).shape  # sorted indices of the kept tokens
torch.Size([2, 4])
>>> compressor.compress(features, k).shape  # the kept rows; gradients flow back to `features`
torch.Size([2, 4, 8])

```
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .._names import refuse_taken

_COMPRESSORS: dict[str, TokenCompressor] = {}


class TokenCompressor:
    """Base class of visual token compressors.

    Subclasses implement [`~TokenCompressor.select`]; calling the compressor validates the inputs, runs `select`
    without autograd on a detached float32 copy of the features and returns sorted indices. `compress` gathers the
    kept rows from the original features, so gradients reach the projector through them.

    Context keyword arguments understood by the built-in methods (callers may pass more; unknown keys are ignored):

        grid_size (`tuple[int, int]` or `None`, *optional*):
            The `(rows, cols)` patch grid of the image's tokens in raster order. When absent or `None`, a perfect
            square number of tokens is taken as a square grid; methods that need a grid raise otherwise.
        cls_attention (`torch.Tensor` of shape `(num_images, num_tokens)`, *optional*):
            Attention paid by the vision encoder's [CLS] token to each patch token.
        generator (`torch.Generator`, *optional*):
            Source of randomness for stochastic methods, so that selections are reproducible.

    Attributes:
        name (`str`):
            The name the compressor is registered under.
        requires (`frozenset[str]`):
            Context keys the method cannot run without (the model adapter must provide them).
        selects (`bool`):
            Whether the kept tokens are a subset of the input tokens (`False` for methods that build new ones, such
            as `pool`; features aligned with the visual tokens, like Qwen3-VL's deepstack features, then go through
            the same reduction).
    """

    name: str = ""
    requires: frozenset[str] = frozenset()
    selects: bool = True

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        """Return the indices of the `k` kept tokens of every image.

        Args:
            features (`torch.Tensor` of shape `(num_images, num_tokens, dim)`):
                Detached float32 features; called under `torch.no_grad()` with `1 <= k < num_tokens`.
            k (`int`):
                Number of tokens to keep per image.

        Returns:
            `torch.LongTensor` of shape `(num_images, k)`: token indices, each row sorted ascending.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `select(features, k, **context)`.")

    def __call__(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        """Validate, then return the sorted indices `(num_images, k)` of the tokens kept for every image."""
        k = self._check_inputs(features, k)
        num_images, num_tokens, _ = features.shape
        if k == num_tokens or num_images == 0:
            return torch.arange(k, device=features.device).expand(num_images, k).clone()
        with torch.no_grad():
            indices = self.select(features.detach().float(), k, **context)
        if indices.shape != (num_images, k):
            raise RuntimeError(
                f"Token compressor {self.name!r} returned indices of shape {tuple(indices.shape)}, "
                f"expected {(num_images, k)}."
            )
        # Raster order is part of the contract; sorting here also covers custom methods.
        return indices.to(device=features.device, dtype=torch.long).sort(dim=1).values

    def compress(self, features: torch.Tensor, k: int, **context) -> torch.Tensor:
        """Return the kept tokens `(num_images, k, dim)`, gathered from `features` (autograd flows through them)."""
        return self.compress_with_indices(features, k, **context)[1]

    def compress_with_indices(
        self, features: torch.Tensor, k: int, **context
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Return `(indices, kept)`: the sorted token indices `(num_images, k)` the kept tokens `(num_images, k, dim)`
        stand for. For selecting methods `kept` is `features` at `indices`; a method that builds new tokens (e.g.
        `pool`) returns them with the index of a token each one represents (its position, for M-RoPE models)."""
        indices = self(features, k, **context)
        return indices, torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))

    def budget(
        self,
        num_tokens: int,
        keep_ratio: float = 1.0,
        num_keep: int | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> int:
        """Number of tokens kept per image.

        `k = max(1, round(keep_ratio * num_tokens))`. This deliberately differs from the reference DivPrune code,
        which computes `int((1 - 0.9) * 576) = 57` because `1 - 0.9` is slightly below 0.1 in floating point; here
        a 10 % budget of 576 tokens is 58.

        Args:
            num_tokens (`int`):
                Visual tokens per image before compression.
            keep_ratio (`float`, *optional*, defaults to `1.0`):
                Fraction of tokens kept, in (0, 1]. Ignored when `num_keep` is given.
            num_keep (`int`, *optional*):
                Absolute number of tokens kept, in [1, num_tokens]; overrides `keep_ratio`.
            grid_size (`tuple[int, int]`, *optional*):
                The `(rows, cols)` patch grid; used by methods whose achievable budgets depend on it.

        Returns:
            `int`: the number of tokens `k` to keep.
        """
        num_tokens = check_num_tokens(num_tokens)
        if num_keep is not None:
            num_keep = check_num_keep(num_keep, num_tokens)
            self.check_achievable(num_keep, num_tokens, grid_size)
            return num_keep
        check_keep_ratio(keep_ratio)
        return self.budget_from_ratio(num_tokens, keep_ratio, grid_size)

    def budget_from_ratio(self, num_tokens: int, keep_ratio: float, grid_size: tuple[int, int] | None) -> int:
        """The budget of a validated `keep_ratio`: `max(1, round(keep_ratio * num_tokens))`. A method whose achievable
        budgets differ (such as `pool`'s pooled grids) overrides it and [`~TokenCompressor.check_achievable`]."""
        return max(1, round(keep_ratio * num_tokens))

    def check_achievable(self, num_keep: int, num_tokens: int, grid_size: tuple[int, int] | None) -> None:
        """Raise `ValueError` if the method cannot keep exactly `num_keep` of `num_tokens` tokens (already checked to
        be in [1, num_tokens]); every such budget is achievable by default."""

    def describe_budget(self, keep_ratio: float = 1.0, num_keep: int | None = None) -> str:
        """What the method keeps of each image, in words, for the model card: a predicate that follows the method's
        name (`"`divprune` keeps 25 % of each image's visual tokens ..."`). A method whose [`~TokenCompressor.budget`]
        differs describes its own.

        Example:

        ```python
        >>> from hf_sparse_mllm.compressors import get_compressor
        >>> get_compressor("divprune").describe_budget(keep_ratio=0.25)
        "keeps 25 % of each image's visual tokens (k = max(1, round(0.25 N))), in raster order"

        ```
        """
        if num_keep is not None:
            return f"keeps {num_keep} visual tokens per image (all of an image with fewer), in raster order"
        return f"keeps {100 * keep_ratio:g} % of each image's visual tokens (k = max(1, round({keep_ratio} N))), in raster order"

    def _check_inputs(self, features: torch.Tensor, k: int) -> int:
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(
                f"Token compressor {self.name!r} expects features of shape (num_images, num_tokens, dim), got {shape}."
            )
        try:
            k = operator.index(k)
        except TypeError:
            raise TypeError(f"k must be an integer number of tokens, got {k!r}.") from None
        num_tokens = features.shape[1]
        if not 1 <= k <= num_tokens:
            raise ValueError(f"k must be in [1, num_tokens] = [1, {num_tokens}], got {k}.")
        return k

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, requires={sorted(self.requires)})"


def register_compressor(name: str, *, requires=()):
    """Class decorator that instantiates a [`TokenCompressor`] subclass and registers it under `name`.

    Args:
        name (`str`):
            Registry name, used as `SparseMLLMConfig(token_compressor=name)`. Must not be taken already.
        requires (`Iterable[str]`, *optional*, defaults to `()`):
            Context keys the method needs from the model adapter, e.g. `{"cls_attention"}`.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import TokenCompressor, get_compressor, register_compressor
    >>> @register_compressor("docs_first_k")
    ... class FirstK(TokenCompressor):
    ...     def select(self, features, k, **context):
    ...         return torch.arange(k).expand(features.shape[0], k)
    >>> get_compressor("docs_first_k")(torch.randn(1, 6, 4), 2)
    tensor([[0, 1]])

    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A token compressor name must be a non-empty string, got {name!r}.")
    if isinstance(requires, str):
        requires = (requires,)

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, TokenCompressor)):
            raise TypeError(f"register_compressor({name!r}) decorates TokenCompressor subclasses, got {cls!r}.")
        refuse_taken(_COMPRESSORS, name, cls, kind="Token compressor name", decorator="register_compressor")
        instance = cls()
        instance.name = name
        instance.requires = frozenset(requires)
        _COMPRESSORS[name] = instance
        return cls

    return decorator


def get_compressor(name: str) -> TokenCompressor:
    """Return the compressor registered under `name` (raises `ValueError` listing the registered names)."""
    if name not in _COMPRESSORS:
        raise ValueError(
            f"Unknown token compressor {name!r}; registered compressors: {list_compressors()}. "
            "Add a new one with @register_compressor(name)."
        )
    return _COMPRESSORS[name]


def unregister_compressor(name: str) -> TokenCompressor:
    """Remove the compressor registered under `name` and return it (e.g. to register a new version of a method under
    the same name in a notebook, or to clean up after a test)."""
    compressor = get_compressor(name)
    del _COMPRESSORS[name]
    return compressor


def list_compressors() -> list[str]:
    """Sorted names of the registered compressors."""
    return sorted(_COMPRESSORS)


def resolve_grid_size(num_tokens: int, grid_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The `(rows, cols)` patch grid of `num_tokens` tokens: `grid_size` if given, else square if possible.

    Args:
        num_tokens (`int`):
            Tokens per image.
        grid_size (`tuple[int, int]`, *optional*):
            Explicit grid; `rows * cols` must equal `num_tokens`.
    """
    if grid_size is not None:
        rows, cols = (int(v) for v in grid_size)
        if rows < 1 or cols < 1 or rows * cols != num_tokens:
            raise ValueError(
                f"grid_size={tuple(grid_size)} does not match {num_tokens} tokens per image (rows * cols must equal it)."
            )
        return rows, cols
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens per image is not a square grid; pass grid_size=(rows, cols) in the context "
            "(an image with a [CLS] token in its features has no grid)."
        )
    return side, side


def check_num_tokens(num_tokens: int) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}.")
    return int(num_tokens)


def check_num_keep(num_keep: int, num_tokens: int | None = None) -> int:
    """`num_keep` as an `int`, or a `ValueError`: it must be an integer in [1, num_tokens] (>= 1 without a size)."""
    upper = num_tokens if num_tokens is not None else float("inf")
    if isinstance(num_keep, bool) or not isinstance(num_keep, numbers.Integral) or not 1 <= num_keep <= upper:
        if num_tokens is None:
            raise ValueError(f"num_keep must be a positive integer number of visual tokens, got {num_keep!r}.")
        raise ValueError(
            f"num_keep must be an integer in [1, {num_tokens}] (the image has {num_tokens} visual tokens), "
            f"got {num_keep!r}."
        )
    return int(num_keep)


def check_keep_ratio(keep_ratio: float) -> None:
    """A `ValueError` unless `keep_ratio` is a real number in (0, 1]."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")

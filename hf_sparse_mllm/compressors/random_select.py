"""Uniform random token selection: the ablation baseline (seeded, reproducible)."""

from __future__ import annotations

import torch

from .registry import TokenCompressor, register_compressor


@register_compressor("random")
class RandomCompressor(TokenCompressor):
    """A uniform random subset of `k` tokens per image, drawn without replacement from `context["generator"]`.

    The generator is required: an unseeded draw would give every process and every resumed run a different
    selection. Images in a batch get independent subsets. (This module is not called `random.py` so it can never
    shadow the standard library module.)

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import get_compressor
    >>> features = torch.randn(2, 10, 4)
    >>> a = get_compressor("random")(features, 3, generator=torch.Generator().manual_seed(0))
    >>> b = get_compressor("random")(features, 3, generator=torch.Generator().manual_seed(0))
    >>> torch.equal(a, b)
    True

    ```
    """

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        generator = context.get("generator")
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                "The random compressor needs a seeded torch.Generator as context['generator'] "
                f"(randomness must be seeded to be reproducible), got {generator!r}."
            )
        num_images, num_tokens, _ = features.shape
        # Drawn on the generator's device so a CPU generator works with features on any device.
        keys = torch.rand(num_images, num_tokens, generator=generator, device=generator.device)
        return keys.argsort(dim=1)[:, :k].sort(dim=1).values.to(features.device)

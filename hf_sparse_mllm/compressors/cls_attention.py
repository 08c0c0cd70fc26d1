"""Keep the tokens the vision encoder's [CLS] token attends to most (FasterVLM / VisionZip "dominant tokens")."""

from __future__ import annotations

import torch

from .registry import TokenCompressor, register_compressor


@register_compressor("cls_attention", requires={"cls_attention"})
class ClsAttentionCompressor(TokenCompressor):
    """Top-`k` patch tokens by the attention the [CLS] token pays them, from `context["cls_attention"]`.

    `context["cls_attention"]` has shape `(num_images, num_tokens)`, one score per visual token, as provided by the
    model adapter (from the selected vision layer). Ties go to the lower token index (stable sort). Only for vision
    towers with a [CLS] token.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.compressors import get_compressor
    >>> attention = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    >>> get_compressor("cls_attention")(torch.randn(1, 5, 8), 2, cls_attention=attention)
    tensor([[1, 3]])

    ```
    """

    def select(self, features: torch.Tensor, k: int, **context) -> torch.LongTensor:
        attention = context.get("cls_attention")
        if attention is None:
            raise ValueError(
                "The cls_attention compressor needs context['cls_attention'], a (num_images, num_tokens) tensor of "
                "the attention the vision encoder's [CLS] token pays each patch token; the model adapter provides it "
                "for towers with a [CLS] token."
            )
        expected = tuple(features.shape[:2])
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != expected:
            shape = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
            raise ValueError(
                f"context['cls_attention'] must have shape (num_images, num_tokens) = {expected}, got {shape}."
            )
        scores = attention.detach().to(device=features.device, dtype=torch.float32)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return order[:, :k].sort(dim=1).values

"""`gemma3`: a fixed number of visual tokens per image (`mm_tokens_per_image`, a square grid), one run per image.

`token_type_ids` (1 on the image tokens) are gathered with the shortened sequence, so the bidirectional attention
Gemma 3 builds inside each image covers the kept tokens and the mode isolator tokens prepended to them.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, register_adapter


@register_adapter("gemma3")
class Gemma3Adapter(ArchitectureAdapter):
    def run_lengths(self, inputs: dict) -> list[int]:
        pixel_values = inputs.get("pixel_values")
        return [] if pixel_values is None else [self.config.mm_tokens_per_image] * int(pixel_values.shape[0])

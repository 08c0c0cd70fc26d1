"""`idefics3` and `smolvlm`: images split into tiles plus a global image, one run per tile.

Tiles are separated by text (`<fake_token_around_image><row_r_col_c>`), so every tile is its own run and its own
unit on a square grid: **the budget is per tile** (`round(keep_ratio * tokens_per_tile)`), and the mode isolator is
prepended to every tile's kept tokens. `pixel_values` is `(samples, max_tiles, ...)` zero-padded, so the real tiles
are counted as the model counts them (not all-zero).
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter


@register_adapter("idefics3", "smolvlm")
class Idefics3Adapter(ArchitectureAdapter):
    def _tokens_per_tile(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.config.scale_factor**2

    def run_lengths(self, inputs: dict) -> list[int]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        tiles = pixel_values.flatten(0, 1).flatten(1).ne(0).any(1).sum()
        return [self._tokens_per_tile()] * int(tiles)

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        return {"pixel_values": torch.ones(1, 1, vision.num_channels, vision.image_size, vision.image_size)}

"""`idefics3` and `smolvlm`: images split into tiles plus a global image, one run per tile.

Tiles are separated by text (`<fake_token_around_image><row_r_col_c>`), so every tile is its own run and its own
unit on a square grid: **the budget is per tile** (`round(keep_ratio * tokens_per_tile)`), and the mode isolator is
prepended to every tile's kept tokens. `pixel_values` is `(samples, max_tiles, ...)` zero-padded, so the real tiles
are counted as the model counts them (not all-zero).
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter


class PerTileAdapter(ArchitectureAdapter):
    """Tiles of `vision_config.image_size` pixels, each one run of `(image_size // patch_size) ** 2 / downsample ** 2`
    visual tokens on a square grid (Idefics3, SmolVLM, Aya Vision); subclasses give the downsampling factor and how
    the tiles of `pixel_values` are counted."""

    def downsample_factor(self) -> int:
        raise NotImplementedError

    def num_tiles(self, pixel_values: torch.Tensor) -> int:
        return int(pixel_values.shape[0])

    def _tokens_per_tile(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.downsample_factor() ** 2

    def run_lengths(self, inputs: dict) -> list[int]:
        pixel_values = inputs.get("pixel_values")
        return [] if pixel_values is None else [self._tokens_per_tile()] * self.num_tiles(pixel_values)


@register_adapter("idefics3", "smolvlm")
class Idefics3Adapter(PerTileAdapter):
    def downsample_factor(self) -> int:
        return self.config.scale_factor

    def num_tiles(self, pixel_values: torch.Tensor) -> int:
        return int(pixel_values.flatten(0, 1).flatten(1).ne(0).any(1).sum())

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        return {"pixel_values": torch.ones(1, 1, vision.num_channels, vision.image_size, vision.image_size)}

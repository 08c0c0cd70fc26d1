"""`aya_vision`: dynamic tiling plus a thumbnail, pixel-shuffle projector; one placeholder run per tile.

Each image is `<|START_OF_IMG|>`, then per tile a text marker (`TILE_<i>`, the thumbnail's `TILE_GLOBAL`, last) and
`<|IMG_PATCH|> x tokens_per_tile`, then `<|END_OF_IMG|>`. The markers separate the tiles, so every tile is its own
run and its own unit on a square grid, counted from `pixel_values` (`(tiles of all images, ...)`): **the budget is
per tile**, and the mode isolator is prepended to every tile's kept tokens, as for Idefics3. The processor returns no
per-image tile counts, so each tile counts as an image in the layout (`visual_tokens_per_image` is per tile).
The pixel shuffle emits each tile's tokens in column-major order: a square grid all the same (transposed), so
grid-based compressors pool the same 2 x 2 neighbourhoods.
"""

from __future__ import annotations

from .base import register_adapter
from .idefics3 import PerTileAdapter


@register_adapter("aya_vision")
class AyaVisionAdapter(PerTileAdapter):
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

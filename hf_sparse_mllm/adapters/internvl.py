"""`internvl`: dynamic tiling plus a thumbnail; one run `<img> <IMG_CONTEXT> x (tokens * tiles) </img>` per image.

The processor returns no per-image tile counts, so the runs are the placeholder spans themselves, checked against
the tiles in `pixel_values`; each tile of a run is one unit on a square grid (the budget is per tile), and the mode
isolator goes once at the start of each image.
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, VisualUnit, register_adapter


@register_adapter("internvl")
class InternVLAdapter(ArchitectureAdapter):
    def _tile_side(self) -> int:
        vision = self.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        return int(size // patch * self.config.downsample_ratio)

    def run_lengths(self, inputs: dict) -> None:
        pixel_values = inputs.get("pixel_values")
        tiles = 0 if pixel_values is None else int(pixel_values.shape[0])
        spans = int((inputs["input_ids"] == self.image_token_id).sum())
        if spans != tiles * self._tile_side() ** 2:
            raise ValueError(
                f"The batch has {spans} image placeholder tokens (id {self.image_token_id}) but {tiles} image tiles of "
                f"{self._tile_side() ** 2} visual tokens each (expected {tiles * self._tile_side() ** 2}). Build the "
                "prompts with the model's processor and do not truncate inside an image."
            )
        return None  # every image is its own span

    def units(self, inputs, runs):
        side = self._tile_side()
        per_tile = side * side
        units = []
        for index, run in enumerate(runs):
            if run.length % per_tile:
                raise ValueError(
                    f"Batch row {run.row} has a run of {run.length} image placeholder tokens, not a whole number of "
                    f"{per_tile}-token tiles."
                )
            for tile in range(run.length // per_tile):
                units.append(VisualUnit(index, torch.arange(tile * per_tile, (tile + 1) * per_tile), (side, side)))
        return units

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        return {"pixel_values": torch.ones(1, vision.num_channels, size, size)}

"""`mistral3` (Pixtral tower, patch merger): images at their own resolution, one placeholder run per image row.

Each image is `[IMG] x cols [IMG_BREAK]` per row of visual tokens in `input_ids`, its last row ending in `[IMG_END]`,
with `rows, cols = image_sizes // (patch_size * spatial_merge_size)`. The separators are ordinary tokens with their
own embeddings, so every row is its own placeholder run (`rows` runs of `cols` tokens per image, all belonging to
the image), and `get_image_features(...).pooler_output` (a tuple with one `(rows * cols, hidden)` tensor per image, in
raster order) fills them in order.

**The budget is per row**: each run is one unit on a `(1, cols)` grid, keeping `round(keep_ratio * cols)` (at least
one) of its tokens; the mode isolator is prepended once per image, to its first row's kept tokens. One budget per
image across its rows is not possible here: the sequence is shortened before the forward, so every run's number of
slots (between its `[IMG_BREAK]` tokens, which stay in place) must be fixed before the features that a per-image
selection would distribute over the rows exist.
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter, whole_run_units


@register_adapter("mistral3")
class Mistral3Adapter(ArchitectureAdapter):
    def _token_side(self) -> int:
        patch = self.config.vision_config.patch_size
        return (patch if isinstance(patch, int) else patch[0]) * self.config.spatial_merge_size

    def _grids(self, inputs: dict) -> list[tuple[int, int]]:
        """`(rows, cols)` of visual tokens of each image of the batch, from `image_sizes`."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            if inputs.get("pixel_values") is not None:
                raise ValueError(f"{type(self).__name__} needs the processor's `image_sizes` in the batch.")
            return []
        side = self._token_side()
        return [(int(height) // side, int(width) // side) for height, width in sizes.tolist()]

    def run_lengths(self, inputs: dict) -> list[int]:
        return [cols for rows, cols in self._grids(inputs) for _ in range(rows)]

    def images_of_runs(self, inputs: dict, num_runs: int) -> list[int]:
        return [image for image, (rows, _) in enumerate(self._grids(inputs)) for _ in range(rows)]

    def units(self, inputs, runs):
        return whole_run_units(runs, [(1, run.length) for run in runs])

    def isolator_runs(self, layout):
        # Once per image, before its first row: a large image has dozens of rows.
        runs = layout.runs
        return [i == 0 or run.image != runs[i - 1].image for i, run in enumerate(runs)]

    def dummy_visual_inputs(self) -> dict:
        side = self._token_side()
        channels = self.config.vision_config.num_channels
        return {"pixel_values": torch.ones(1, channels, side, side), "image_sizes": torch.tensor([[side, side]])}

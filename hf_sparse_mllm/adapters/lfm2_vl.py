"""`lfm2_vl`: SigLIP2 NaFlex tower at each tile's own size, pixel-unshuffle projector, LFM2 decoder; one run per tile.

The image processor resizes a small image, keeping its aspect ratio, to sides that are multiples of
`encoder_patch_size * downsample_factor` (one tile); a large one it resizes to a grid of square tiles and, by default,
adds a thumbnail of the whole image (last). `pixel_values` is `(tiles of all images, max_patches, 3 * patch**2)`,
each tile's patches in raster order, zero-padded, with `pixel_attention_mask` `(tiles, max_patches)` and
`spatial_shapes` `(tiles, 2)`, the `(rows, cols)` of each tile's patches. In `input_ids` an image is
`<|image_start|> <image> x N <|image_end|>` (one tile), or `<|image_start|>`, then `<|img_row_r_col_c|> <image> x N`
per tile and `<|img_thumbnail|> <image> x N` for the thumbnail, then `<|image_end|>`: the markers separate the
tiles, so every tile is one placeholder run (with `use_image_special_tokens=False` the tiles of an image are one
span, which the run lengths cut all the same).

The projector's pixel unshuffle turns each `f x f` block of patches into one visual token (`f =
config.downsample_factor`): token `t` of a tile with `(rows, cols)` patches is the block at `(t // (cols // f),
t % (cols // f))`, and `get_image_features(...).pooler_output` is a list with one `(rows // f * cols // f, hidden)`
tensor per tile. So each run is `(rows // f) * (cols // f)` tokens, read from `spatial_shapes` before the forward,
and one unit on that raster grid: grid-based compressors (`pool`, `redundancy`) see real neighbours. **The budget is
per tile** (thumbnail included), and the mode isolator is prepended to every tile's kept tokens, as for Idefics3 and
Aya Vision. The processor drops its per-image tile counts (`image_rows`, `image_cols`) and the model config does not
know the marker tokens, so each tile counts as an image in the layout (`visual_tokens_per_image` is per tile).

Positions are 1-D: the model numbers the shortened sequence itself; the LFM2 convolution layers see the shortened
sequence as their neighbourhood, as the attention layers do. `cls_attention` does not apply (the tower has no CLS
token).
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter, whole_run_units


@register_adapter("lfm2_vl")
class Lfm2VlAdapter(ArchitectureAdapter):
    """LFM2-VL: `spatial_shapes` give each tile's patch grid, unshuffled `f x f` into its visual tokens.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.adapters import get_adapter
    >>> from hf_sparse_mllm.tiny import build_tiny_lfm2_vl
    >>> model, processor = build_tiny_lfm2_vl(words=["red"], num_hidden_layers=1)
    >>> images = [Image.new("RGB", (40, 30)), Image.new("RGB", (80, 40))]  # one tile; two tiles and a thumbnail
    >>> inputs = processor(text=["<image> red <image>"], images=[images], return_tensors="pt")
    >>> inputs["spatial_shapes"].tolist()  # (rows, cols) of patches per tile
    [[6, 8], [8, 8], [8, 8], [4, 10]]
    >>> layout = get_adapter(model).layout(inputs)
    >>> [(run.length, unit.grid) for run, unit in zip(layout.runs, layout.units)]  # (rows, cols) of visual tokens
    [(12, (3, 4)), (16, (4, 4)), (16, (4, 4)), (10, (2, 5))]

    ```
    """

    def _factor(self) -> int:
        return self.config.downsample_factor

    def _token_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """`(rows, cols)` of each tile's visual tokens, from `spatial_shapes` (its patches)."""
        shapes = inputs.get("spatial_shapes")
        if shapes is None:
            if inputs.get("pixel_values") is not None:
                raise ValueError(
                    f"{type(self).__name__} needs the processor's `spatial_shapes` in the batch (the (rows, cols) of "
                    "patches of every tile in `pixel_values`): keep it with the images."
                )
            return []
        f = self._factor()
        return [(rows // f, cols // f) for rows, cols in shapes.tolist()]

    def run_lengths(self, inputs: dict) -> list[int]:
        # The model splits the projected features by the same product (`get_image_features`).
        return [rows * cols for rows, cols in self._token_grids(inputs)]

    def units(self, inputs, runs):
        # One run per tile, in the order of `spatial_shapes`; the run lengths are the grids' products.
        return whole_run_units(runs, self._token_grids(inputs))

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        f = self._factor()
        # One f x f tile of patches: one visual token.
        return {
            "pixel_values": torch.ones(1, f * f, vision.num_channels * vision.patch_size**2),
            "pixel_attention_mask": torch.ones(1, f * f, dtype=torch.int32),
            "spatial_shapes": torch.tensor([[f, f]]),
        }

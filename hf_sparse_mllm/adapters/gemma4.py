"""`gemma4`: variable resolution, one run per image, each on its own pooled grid.

Each image is `<|image> <|image|> x N <image|>` in `input_ids` (start, soft tokens, end; one run per image). The
image processor patchifies every image to `pixel_values` `(images, max_patches, 3 * patch**2)`, zero-padded, with the
`(x, y)` of each patch in `image_position_ids` (`(-1, -1)` on the padding); the tower average-pools each `k x k`
square of patches (`k = vision_config.pooling_kernel_size`) into one visual token, so `N` is the image's real patches
divided by `k**2`, read from `image_position_ids` before the forward. `get_image_features(...).pooler_output` is a
tuple with one `(N, hidden)` tensor per image, in raster order over the pooled grid: the pooler puts patch `(x, y)`
into token `(y // k) * (width // k) + x // k`, `width` the image's patch columns. So each run is one unit on the
`(height // k, width // k)` grid of its image, and grid-based compressors (`pool`, `redundancy`) see real neighbours.

`mm_token_type_ids` (1 on the soft tokens) are gathered with the shortened sequence: the kept tokens and the mode
isolator tokens prepended to them (which take their run's type) form the block that the sliding-window layers attend
to bidirectionally (`text_config.use_bidirectional_attention == "vision"`; the global layers stay causal). Positions
are 1-D: the model numbers the shortened sequence itself. The per-layer input embeddings (Gemma 4 E2B/E4B) are looked
up from the shortened `input_ids`, where image tokens are padding for them anyway. Videos and audio are not
compressed. `cls_attention` does not apply (the tower has no CLS token).
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter, whole_run_units


@register_adapter("gemma4")
class Gemma4Adapter(ArchitectureAdapter):
    """Gemma 4: `image_position_ids` give each image's patch grid, pooled `k x k` into its visual tokens.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.adapters import get_adapter
    >>> from hf_sparse_mllm.tiny import build_tiny_gemma4
    >>> model, processor = build_tiny_gemma4(words=["red"], num_hidden_layers=1)
    >>> images = [Image.new("RGB", (40, 30)), Image.new("RGB", (30, 60))]
    >>> inputs = processor(text=["<|image|> red <|image|>"], images=[images], return_tensors="pt")
    >>> layout = get_adapter(model).layout(inputs)
    >>> [(run.length, unit.grid) for run, unit in zip(layout.runs, layout.units)]  # (rows, cols) of visual tokens
    [(63, (7, 9)), (55, (11, 5))]

    ```
    """

    visual_inputs = (*ArchitectureAdapter.visual_inputs, "image_position_ids")

    def _kernel(self) -> int:
        return self.config.vision_config.pooling_kernel_size

    def _patch_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """`(rows, cols)` of each image's real patches, from `image_position_ids` (`(x, y)` per patch)."""
        positions = inputs["image_position_ids"]
        real = (positions != -1).all(-1)
        # Padding is (-1, -1): the largest coordinate of each image is that of its last real patch.
        last = torch.where(real.unsqueeze(-1), positions, -1).amax(dim=1)
        return [(int(y) + 1, int(x) + 1) for x, y in last.tolist()]

    def run_lengths(self, inputs: dict) -> list[int]:
        positions = inputs.get("image_position_ids")
        if positions is None:
            if inputs.get("pixel_values") is not None:
                raise ValueError(
                    f"{type(self).__name__} needs the processor's `image_position_ids` in the batch (the (x, y) of "
                    "every patch in `pixel_values`): keep it with the images."
                )
            return []
        real = (positions != -1).all(-1).sum(-1)
        return (real // self._kernel() ** 2).tolist()

    def units(self, inputs, runs):
        k = self._kernel()
        grids = [(rows // k, cols // k) for rows, cols in self._patch_grids(inputs)]
        # A grid only where it accounts for every token of the run (the processor's images always do).
        return whole_run_units(runs, [_grid_if_whole(grids[run.image], run.length) for run in runs])

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        k = self._kernel()
        ys, xs = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        # One k x k square of patches: one visual token.
        return {
            "pixel_values": torch.ones(1, k * k, 3 * vision.patch_size**2),
            "image_position_ids": torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0),
        }


def _grid_if_whole(grid: tuple[int, int], num_tokens: int) -> tuple[int, int] | None:
    return grid if grid[0] * grid[1] == num_tokens else None

"""`llava_next`, `llava_next_video` (images only; its videos are not compressed) and `llava_onevision`: anyres
images, one run of variable length per image.

An image's features are its base tile (`side x side` patches), then its anyres grid cropped to the image's aspect
ratio ("unpadded"; OneVision may also scale it down) with one learned `image_newline` feature after every grid row.
The counts follow from `image_sizes` and the config; rather than re-deriving the model's arithmetic, the layout runs
the model's own `pack_image_features` on one-channel dummies, whose output marks where the newline rows fall.

Units: the base tile, and the grid cut into blocks of at most `side x side` patches (about one anyres tile each, so
a DivPrune call compares a few hundred tokens, not thousands), each with its own grid. **Newline rows are kept in
place**: they are never compressed, and each kept grid token keeps its row's newline after it in raster order (an
image of `H` grid rows keeps its `H` newline features).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import ArchitectureAdapter, VisualUnit, register_adapter, square_grid

_NEWLINE = -1.0


@register_adapter("llava_next", "llava_next_video")
class LlavaNextAdapter(ArchitectureAdapter):
    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def _tiles_per_image(self, inputs: dict) -> list[int]:
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in inputs["image_sizes"]
        ]

    def _pack(self, dummies: list[torch.Tensor], inputs: dict, newline: torch.Tensor) -> list[torch.Tensor]:
        packed, _ = self.model.model.pack_image_features(
            dummies,
            inputs["image_sizes"],
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=newline,
        )
        return packed

    def _structures(self, inputs: dict) -> list[torch.Tensor]:
        """Per image, a boolean vector over its visual tokens that is True at the newline features."""
        if inputs.get("pixel_values") is None:
            return []
        if inputs.get("image_sizes") is None:
            raise ValueError(f"{type(self).__name__} needs the processor's `image_sizes` in the batch.")
        tokens = self._side() ** 2
        dummies = [torch.zeros(n, tokens, 1) for n in self._tiles_per_image(inputs)]
        with torch.no_grad():
            packed = self._pack(
                dummies, {**inputs, "image_sizes": inputs["image_sizes"].cpu()}, torch.full((1,), _NEWLINE)
            )
        return [p[:, 0] == _NEWLINE for p in packed]

    def layout(self, inputs: dict):
        structures = self._structures(inputs)
        return self.make_layout(inputs, [len(s) for s in structures], lambda inputs, runs: self._units(structures))

    def _units(self, structures: list[torch.Tensor]) -> list[VisualUnit]:
        side = self._side()
        base = side * side
        units = []
        for index, newline in enumerate(structures):
            units.append(VisualUnit(index, torch.arange(base), square_grid(base)))
            rows = int(newline[base:].sum())
            if rows == 0:  # no anyres grid (or no newline rows): the rest is one unit
                rest = torch.arange(base, len(newline))
                if len(rest):
                    units.append(VisualUnit(index, rest, None))
                continue
            width = (len(newline) - base) // rows - 1
            for top in range(0, rows, side):
                for left in range(0, width, side):
                    r = torch.arange(top, min(top + side, rows))
                    c = torch.arange(left, min(left + side, width))
                    offsets = (base + r[:, None] * (width + 1) + c[None, :]).flatten()
                    units.append(VisualUnit(index, offsets, (len(r), len(c))))
            units.append(VisualUnit(index, newline.nonzero().flatten(), None, compress=False))
        return units

    def dummy_visual_inputs(self) -> dict:
        size = self.config.vision_config.image_size
        sizes = torch.tensor([[size, size]])
        tiles = self._tiles_per_image({"image_sizes": sizes})[0]
        return {"pixel_values": torch.ones(1, tiles, 3, size, size), "image_sizes": sizes}


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """As LLaVA-NeXT; a sample with several images gets no anyres grid (its images are base tile plus newline)."""

    def _tiles_per_image(self, inputs: dict) -> list[int]:
        tiles = super()._tiles_per_image(inputs)
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return tiles
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [t if alone else 1 for t, alone in zip(tiles, single)]

    def _pack(self, dummies, inputs, newline):
        packed, _ = self.model.model.pack_image_features(
            dummies,
            inputs["image_sizes"],
            image_newline=newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return packed

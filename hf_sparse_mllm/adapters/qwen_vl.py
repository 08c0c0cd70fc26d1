"""`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`, `qwen3_5`, `qwen3_5_moe`, and `glm4v`, `glm4v_moe`,
`glm46v` (the same layout): dynamic resolution and M-RoPE.

Each image is one run `<|vision_start|> <|image_pad|> x N <|vision_end|>` (GLM-4V:
`<|begin_of_image|> <|image|> x N <|end_of_image|>`) with `N = t * h * w / merge**2` from
`image_grid_thw`, one unit on the merged `(h / merge, w / merge)` grid. Features are intercepted at
`get_image_features(...).pooler_output`, which is in raster order (Qwen2.5-VL's merger works in window order and
`get_image_features` restores raster order: a hook on the merger would see the wrong order). Positions are 3-D
(M-RoPE) and computed by the model's own `get_rope_index` on the *full* sequence; kept tokens keep them, and so does
the text after an image (GLM-4V's `get_rope_index` has the same signature). Qwen3-VL's and Qwen3-VL-MoE's
`deepstack_features` follow the same selection (zeros at the isolator tokens); Qwen3.5's tower has none, and its
hybrid decoder (linear and full attention) takes the same positions. Videos are not compressed.
"""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter, whole_run_units


@register_adapter("qwen2_vl", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe")
class QwenVLAdapter(ArchitectureAdapter):
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def run_lengths(self, inputs: dict) -> list[int]:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            if inputs.get("pixel_values") is not None:
                raise ValueError(f"{type(self).__name__} needs the processor's `image_grid_thw` in the batch.")
            return []
        if inputs.get("mm_token_type_ids") is None:
            # Checked on every batch: without it Qwen2.5-VL silently falls back to 1-D positions.
            raise ValueError(
                f"{type(self.model).__name__} needs `mm_token_type_ids` (returned by its processor beside "
                "`input_ids`) to compute its 3-D M-RoPE positions: keep it in the batch (a collator must pad and "
                "truncate it with `input_ids`)."
            )
        return [int(t * h * w) // self._merge() ** 2 for t, h, w in grid.tolist()]

    def units(self, inputs, runs):
        merge = self._merge()
        grids = [(h // merge, w // merge) if t == 1 else None for t, h, w in inputs["image_grid_thw"].tolist()]
        return whole_run_units(runs, grids)

    def full_position_ids(self, inputs: dict) -> torch.Tensor:
        keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
        extra = {key: inputs[key] for key in keys if inputs.get(key) is not None}
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], **extra
        )
        return positions

    def dummy_visual_inputs(self) -> dict:
        vision = self.config.vision_config
        merge = self._merge()
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.ones(merge * merge, patch),
            "image_grid_thw": torch.tensor([[1, merge, merge]]),
        }


@register_adapter("qwen3_vl", "qwen3_vl_moe")
class Qwen3VLAdapter(QwenVLAdapter):
    selected_outputs = ("deepstack_features",)


@register_adapter("glm4v", "glm4v_moe", "glm46v")
class Glm4vAdapter(QwenVLAdapter):
    """GLM-4V writes video frames with the image placeholder too, marked 2 in `mm_token_type_ids` (images: 1): only
    the image ones are runs, the video tokens pass through uncompressed."""

    def placeholder_mask(self, inputs: dict) -> torch.Tensor:
        mask = super().placeholder_mask(inputs)
        types = inputs.get("mm_token_type_ids")
        return mask if types is None else mask & (types == 1).to(mask.device)

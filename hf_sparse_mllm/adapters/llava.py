"""`llava` (LLaVA-1.5: CLIP-style tower, MLP projector, decoder LM) and `vipllava` (the same, features of several
tower layers concatenated): one run of fixed length per image."""

from __future__ import annotations

import torch

from .base import ArchitectureAdapter, register_adapter, whole_run_units


class FixedGridAdapter(ArchitectureAdapter):
    """Every image has `(image_size // patch_size) ** 2` visual tokens on a square grid, one more when the CLS feature
    is kept (the run is then not a grid): one run and one unit per image."""

    def _patches_per_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def keeps_cls(self) -> bool:
        return False

    def tokens_per_image(self) -> int:
        return self._patches_per_side() ** 2 + self.keeps_cls()

    def run_lengths(self, inputs: dict) -> list[int]:
        if inputs.get("image_sizes") is not None:
            raise ValueError(
                f"{type(self).__name__} handles fixed-size images; `image_sizes` (variable resolution) is not "
                "supported."
            )
        pixel_values = inputs.get("pixel_values")
        return [] if pixel_values is None else [self.tokens_per_image()] * int(pixel_values.shape[0])

    def units(self, inputs, runs):
        side = self._patches_per_side()
        grid = None if self.keeps_cls() else (side, side)
        return whole_run_units(runs, [grid] * len(runs))


@register_adapter("vipllava")
class VipLlavaAdapter(FixedGridAdapter):
    """VipLLaVA: the CLS feature is dropped from each of the tower layers whose features it concatenates."""


@register_adapter("llava")
class LlavaAdapter(FixedGridAdapter):
    """LLaVA: the CLS feature is kept with the `"full"` feature strategy; `cls_attention` applies (CLIP/SigLIP towers
    with a CLS token)."""

    def keeps_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "full"

    def _selected_vision_layer(self) -> int:
        """Index of the encoder layer whose output `vision_feature_layer` selects (hidden_states[0] = embeddings)."""
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        num_layers = self.config.vision_config.num_hidden_layers
        return feature_layer % (num_layers + 1) - 1

    def context_hooks(self, needs: frozenset[str], context: dict) -> list:
        unsupported = set(needs) - {"cls_attention"}
        if unsupported:
            return super().context_hooks(frozenset(unsupported), context)
        if "cls_attention" not in needs:
            return []
        layer_index = self._selected_vision_layer()
        if layer_index < 0:
            raise ValueError(
                "cls_attention needs vision_feature_layer to select an encoder layer, not the embeddings."
            )
        tower = self.model.model.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        if encoder is None or not hasattr(encoder.layers[layer_index].self_attn, "q_proj"):
            raise ValueError(
                f"cls_attention needs a CLIP/SigLIP-style vision tower with a CLS token, got {type(tower).__name__}."
            )
        attention = encoder.layers[layer_index].self_attn
        drop_cls = self.config.vision_feature_select_strategy == "default"

        # Recompute the CLS row of that layer's attention from its input, so the tower keeps its fast attention kernel.
        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                heads, head_dim = module.num_heads, module.head_dim
                query = module.q_proj(hidden[:, :1]).view(hidden.shape[0], 1, heads, head_dim).transpose(1, 2)
                keys = module.k_proj(hidden).view(hidden.shape[0], -1, heads, head_dim).transpose(1, 2)
                scores = (query @ keys.transpose(-1, -2)).float() * module.scale
                cls_row = scores.softmax(-1).mean(1).squeeze(1)  # (images, tokens), averaged over heads
            context["cls_attention"] = cls_row[:, 1:] if drop_cls else cls_row  # one row per image = per unit

        return [attention.register_forward_pre_hook(capture, with_kwargs=True)]

"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 layout: CLIP-style tower, MLP projector, decoder LM)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ArchitectureAdapter, register_adapter


@register_adapter("llava")
class LlavaAdapter(ArchitectureAdapter):
    """Each image is one run of placeholder tokens in the prompt; the projector sees all images of a batch at once,
    so one forward hook on `multi_modal_projector` compresses every image."""

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.model.config.text_config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def _patches_per_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def tokens_per_image(self) -> int:
        extra = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return self._patches_per_side() ** 2 + extra

    def grid_size(self) -> tuple[int, int] | None:
        if self.model.config.vision_feature_select_strategy == "full":
            return None  # the CLS token heads the sequence: it is not a grid
        side = self._patches_per_side()
        return (side, side)

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def num_images(self, inputs: dict) -> int:
        if inputs.get("image_sizes") is not None:
            raise ValueError(
                "LlavaAdapter handles fixed-size images; `image_sizes` (variable resolution) is not supported."
            )
        return super().num_images(inputs)

    def _selected_vision_layer(self) -> int:
        """Index of the encoder layer whose output `vision_feature_layer` selects (hidden_states[0] = embeddings)."""
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        num_layers = self.model.config.vision_config.num_hidden_layers
        return feature_layer % (num_layers + 1) - 1

    def _context_hooks(self, needs: frozenset[str], context: dict) -> list:
        unsupported = set(needs) - {"cls_attention"}
        if unsupported:
            return super()._context_hooks(frozenset(unsupported), context)
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
        drop_cls = self.model.config.vision_feature_select_strategy == "default"

        # Recompute the CLS row of that layer's attention from its input, so the tower keeps its fast attention kernel.
        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                heads, head_dim = module.num_heads, module.head_dim
                query = module.q_proj(hidden[:, :1]).view(hidden.shape[0], 1, heads, head_dim).transpose(1, 2)
                keys = module.k_proj(hidden).view(hidden.shape[0], -1, heads, head_dim).transpose(1, 2)
                scores = (query @ keys.transpose(-1, -2)).float() * module.scale
                cls_row = scores.softmax(-1).mean(1).squeeze(1)  # (images, tokens), averaged over heads
            context["cls_attention"] = cls_row[:, 1:] if drop_cls else cls_row

        return [attention.register_forward_pre_hook(capture, with_kwargs=True)]

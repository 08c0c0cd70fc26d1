"""`paligemma`: SigLIP tower, linear projector, Gemma decoder with a prefix-LM mask; a fixed square grid of
`(image_size // patch_size) ** 2` visual tokens per image, one run per image, images first.

`token_type_ids` (0 on the images and the prompt, the bidirectional prefix; 1 on the answer) are gathered with the
shortened sequence. The mode isolator tokens take their run's type, 0, so they join the prefix with the kept image
tokens. Positions stay 1-D: the model numbers the shortened sequence itself (from 1, as PaliGemma does).
`cls_attention` does not apply (SigLIP has no CLS token).
"""

from __future__ import annotations

from .base import register_adapter
from .llava import FixedGridAdapter


@register_adapter("paligemma")
class PaliGemmaAdapter(FixedGridAdapter):
    """PaliGemma (1 and 2): LLaVA-1.5's fixed grid per image, without a CLS feature."""

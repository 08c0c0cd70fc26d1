"""Tiny, offline vision-language models: a word-level tokenizer, a processor and a randomly initialised model per family.

Nothing here downloads anything: tokenizers are built with the `tokenizers` library from a word list, image
processors are the families' PIL backends (no `torchvision`), and models are built from configs. Used by the tests,
the demo and the benchmarks. Every family is registered under its `model_type`, and its builder takes `words`,
`seed`, `padding_side` and the same widths and depths (described once, in [`build_tiny_model_and_processor`]) plus
its family's image geometry:

```python
>>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor, list_tiny_families
>>> "llava" in list_tiny_families()
True
>>> model, processor = build_tiny_model_and_processor("llava", words=["what", "color", "red"])
>>> model.config.image_seq_length
16
```

Each family's module docstring records its geometry: visual tokens per image, the placeholder layout in
`input_ids`, the extra inputs its processor returns and the type of `get_image_features(...).pooler_output`. With
the default shapes (visual tokens for a 40 x 30 and a 30 x 60 image, width x height; Qwen: 64 x 48 and 48 x 96):

| family | module | visual tokens | units in `input_ids` | extra processor outputs | `pooler_output` |
|---|---|---|---|---|---|
| `llava` | `llava` | 16, 16 | one run per image | - | list per image |
| `llava_next`, `llava_next_video` | `llava_next` | 44, 56 | one run per image | `image_sizes` | list per image |
| `llava_onevision` | `llava_next` | 44, 56 (17 each in a multi-image sample) | one run per image | `image_sizes`, `batch_num_images` | list per image |
| `vipllava` | `vipllava` | 16, 16 | one run per image | - | tensor `(images, 16, hidden)` |
| `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`, `qwen3_5`, `qwen3_5_moe` | `qwen` | 12, 18 | one run per image, between start and end tokens | `image_grid_thw`, `mm_token_type_ids` | tuple per image |
| `glm4v`, `glm4v_moe`, `glm46v` | `glm` | 12, 18 | one run per image, between start and end tokens | `image_grid_thw`, `mm_token_type_ids` | tuple per image |
| `idefics3`, `smolvlm` | `idefics` | 80, 48 (100 x 20) | one run of 16 per tile, tiles separated by text | `pixel_attention_mask` | list per batch row |
| `internvl` | `internvl` | 16, 48 | one run per image, between `<img>` and `</img>` | - | tensor `(tiles, 16, hidden)` |
| `aya_vision` | `aya_vision` | 16, 48 | one run of 16 per tile, tiles separated by text (`TILE_1`, ..., `TILE_GLOBAL`) | - | tensor `(tiles, 16, hidden)` |
| `lfm2_vl` | `lfm2_vl` | 12 (3 x 4), 10 (5 x 2); 42 for 80 x 40 (2 tiles of 16 + a thumbnail of 10) | one run per tile, tiles separated by text (`<|img_row_r_col_c|>`, ..., `<|img_thumbnail|>`) | `pixel_attention_mask`, `spatial_shapes` | list per tile |
| `gemma3` | `gemma` | 16, 16 | one run per image, between start and end tokens | `token_type_ids` | tensor `(images, 16, hidden)` |
| `gemma4` | `gemma4` | 63 (7 x 9), 55 (11 x 5) | one run per image, between start and end tokens | `image_position_ids`, `mm_token_type_ids` | tuple per image |
| `paligemma` | `gemma` | 16, 16 | one run per image | `token_type_ids`, `labels` | tensor `(images, 16, hidden)` |
| `mistral3` | `mistral3` | 20 (4 x 5), 18 (6 x 3) | one run per image row, separated by `[IMG_BREAK]`, `[IMG_END]` last | `image_sizes` | tuple per image |

Processors that hold a video processor in `transformers` (Qwen family, GLM-4V, LLaVA-OneVision, LLaVA-NeXT-Video,
SmolVLM, InternVL, Gemma 4) are replaced by image-only subclasses (`ImageOnlyQwen2VLProcessor`, ...): every video
processor needs torchvision (`ImageOnlyGemma4Processor` also drops Gemma 4's audio feature extractor). Mistral3's
`PixtralProcessor` needs torchvision too; its builder has `TinyPixtralProcessor`, the same placeholder expansion.
LFM2-VL's image processor has only a torchvision backend; its builder has `TinyLfm2VlImageProcessor`, the same
geometry with PIL. Every family with an adapter has a builder.
"""

from .aya_vision import build_tiny_aya_vision
from .gemma import build_tiny_gemma3, build_tiny_paligemma
from .gemma4 import ImageOnlyGemma4Processor, build_tiny_gemma4
from .glm import (
    GLM_IMAGE_PLACEHOLDER,
    ImageOnlyGlm4vProcessor,
    ImageOnlyGlm46VProcessor,
    build_tiny_glm4v,
    build_tiny_glm4v_moe,
    build_tiny_glm46v,
)
from .idefics import ImageOnlySmolVLMProcessor, build_tiny_idefics3, build_tiny_smolvlm
from .internvl import ImageOnlyInternVLProcessor, build_tiny_internvl
from .lfm2_vl import TinyLfm2VlImageProcessor, build_tiny_lfm2_vl
from .llava import (
    TINY_LLAVA_PRESETS,
    TinyLlavaPreset,
    build_tiny_llava,
    build_tiny_llava_and_processor,
    build_tiny_processor,
)
from .llava_next import (
    ImageOnlyLlavaNextVideoProcessor,
    ImageOnlyLlavaOnevisionProcessor,
    build_tiny_llava_next,
    build_tiny_llava_next_video,
    build_tiny_llava_onevision,
)
from .mistral3 import TinyPixtralProcessor, build_tiny_mistral3
from .qwen import (
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_5,
    build_tiny_qwen3_5_moe,
    build_tiny_qwen3_vl,
    build_tiny_qwen3_vl_moe,
)
from .registry import build_tiny_model_and_processor, list_tiny_families, register_tiny_family
from .tokenizer import CHAT_TEMPLATE, build_word_tokenizer, make_chat_template
from .vipllava import build_tiny_vipllava

__all__ = [
    "CHAT_TEMPLATE",
    "GLM_IMAGE_PLACEHOLDER",
    "ImageOnlyGemma4Processor",
    "ImageOnlyGlm4vProcessor",
    "ImageOnlyGlm46VProcessor",
    "ImageOnlyInternVLProcessor",
    "ImageOnlyLlavaNextVideoProcessor",
    "ImageOnlyLlavaOnevisionProcessor",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "ImageOnlySmolVLMProcessor",
    "TINY_LLAVA_PRESETS",
    "TinyLfm2VlImageProcessor",
    "TinyLlavaPreset",
    "TinyPixtralProcessor",
    "build_tiny_aya_vision",
    "build_tiny_gemma3",
    "build_tiny_gemma4",
    "build_tiny_glm4v",
    "build_tiny_glm4v_moe",
    "build_tiny_glm46v",
    "build_tiny_idefics3",
    "build_tiny_internvl",
    "build_tiny_lfm2_vl",
    "build_tiny_llava",
    "build_tiny_llava_and_processor",
    "build_tiny_llava_next",
    "build_tiny_llava_next_video",
    "build_tiny_llava_onevision",
    "build_tiny_mistral3",
    "build_tiny_model_and_processor",
    "build_tiny_paligemma",
    "build_tiny_processor",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen3_vl_moe",
    "build_tiny_qwen3_5",
    "build_tiny_qwen3_5_moe",
    "build_tiny_smolvlm",
    "build_tiny_vipllava",
    "build_word_tokenizer",
    "list_tiny_families",
    "make_chat_template",
    "register_tiny_family",
]

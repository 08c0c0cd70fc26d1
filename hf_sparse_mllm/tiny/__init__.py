"""Tiny, offline vision-language models: a word-level tokenizer, a processor and a randomly initialised model per family.

Nothing here downloads anything: tokenizers are built with the `tokenizers` library from a word list, image
processors are the families' PIL backends (no `torchvision`), and models are built from configs. Used by the tests,
the demo and the benchmarks. Every family is registered under its `model_type`:

```python
>>> from hf_sparse_mllm.tiny import build_tiny_model_and_processor, list_tiny_families
>>> "llava" in list_tiny_families()
True
>>> model, processor = build_tiny_model_and_processor("llava", words=["what", "color", "red"])
>>> model.config.image_seq_length
16
```

Each family's module docstring records its geometry: visual tokens per image, the placeholder layout in
`input_ids`, the extra inputs its processor returns and the type of `get_image_features(...).pooler_output`.
"""

from .gemma import build_tiny_gemma3, build_tiny_paligemma
from .idefics import ImageOnlySmolVLMProcessor, build_tiny_idefics3, build_tiny_smolvlm
from .llava import (
    TINY_LLAVA_PRESETS,
    TinyLlavaPreset,
    build_tiny_llava,
    build_tiny_llava_and_processor,
    build_tiny_processor,
)
from .llava_next import ImageOnlyLlavaOnevisionProcessor, build_tiny_llava_next, build_tiny_llava_onevision
from .qwen import (
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
)
from .registry import build_tiny_model_and_processor, list_tiny_families, register_tiny_family
from .tokenizer import CHAT_TEMPLATE, build_word_tokenizer, make_chat_template

__all__ = [
    "CHAT_TEMPLATE",
    "ImageOnlyLlavaOnevisionProcessor",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "ImageOnlySmolVLMProcessor",
    "TINY_LLAVA_PRESETS",
    "TinyLlavaPreset",
    "build_tiny_gemma3",
    "build_tiny_idefics3",
    "build_tiny_llava",
    "build_tiny_llava_and_processor",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_model_and_processor",
    "build_tiny_paligemma",
    "build_tiny_processor",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_smolvlm",
    "build_word_tokenizer",
    "list_tiny_families",
    "make_chat_template",
    "register_tiny_family",
]

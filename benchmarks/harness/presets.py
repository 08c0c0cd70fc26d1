"""What defines one harness run: the tiny model's family and shape, the generated data, the optimisation and the
sparse recipe.

[`DemoConfig`] composes a [`~hf_sparse_mllm.tiny.TinyLlavaPreset`] (the model's shape, for either family: a tiny
LLaVA or a tiny Qwen2-VL, an M-RoPE model) with the fields the library preset does not have. The named presets in
[`DEMO_PRESETS`] are the ones the committed results in `benchmarks/results/` were measured with: changing one changes
what those files describe.

```python
>>> from benchmarks.harness.presets import DEMO_PRESETS
>>> config = DEMO_PRESETS["default"]
>>> config.model.num_visual_tokens, config.model.num_hidden_layers, config.max_steps
(64, 2, 2000)
>>> config.with_model(num_hidden_layers=4).model.num_hidden_layers
4

```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_sparse_mllm import SparseMLLMConfig
from hf_sparse_mllm.compressors import get_compressor
from hf_sparse_mllm.data.vqa import vqa_vocabulary
from hf_sparse_mllm.tiny import TinyLlavaPreset, build_tiny_llava_and_processor, build_tiny_qwen2_vl

# The demo's model: objects fill whole patches, so one narrow tower layer recognises them, and a cheap tower leaves
# most of the step to the language model, which is what token compression speeds up.
DEMO_MODEL = TinyLlavaPreset(
    image_size=128,
    patch_size=16,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    vision_hidden_size=32,
    vision_layers=1,
)


# The tiny families a harness run trains: the name reports use, the tower and decoder in words, and how many patches
# per side one visual token merges.
MODEL_FAMILIES: dict[str, dict[str, Any]] = {
    "llava": {"label": "LLaVA", "tower": "CLIP-style tower", "decoder": "Llama-style decoder", "merge": 1},
    "qwen2_vl": {"label": "Qwen2-VL", "tower": "Qwen2-VL tower", "decoder": "M-RoPE decoder", "merge": 2},
}


@dataclass(frozen=True)
class DemoConfig:
    """
    One harness run: the model's shape, the generated VQA data, the optimisation and the sparse run's recipe.

    Args:
        model ([`~hf_sparse_mllm.tiny.TinyLlavaPreset`], *optional*, defaults to `DEMO_MODEL`):
            The tiny model's shape and image geometry (128 px / 16 px patches, 1 x 32 tower, 2 x 128 decoder). The
            generated images have the model's `image_size`.
        family (`str`, *optional*, defaults to `"llava"`):
            `"llava"` (CLIP-style tower, Llama decoder: one visual token per patch) or `"qwen2_vl"` (Qwen2-VL's
            tower, whose patches are merged 2 x 2 into one visual token, and its M-RoPE decoder; the images are kept
            at `image_size`, and `vision_feature_layer` is not used).
        cell_size (`int`, *optional*, defaults to `16`):
            Scene grid cell; objects fill one cell, aligned to the patches.
        max_objects (`int`, *optional*, defaults to `5`):
            Most objects per scene.
        families (`tuple[str, ...]`, *optional*):
            Question families (default all five, equally weighted).
        border (`int`, *optional*, defaults to `1`):
            Black border width around each shape (`0`: plain fills).
        image_first (`bool`, *optional*, defaults to `False`):
            Image before the question (see [`~hf_sparse_mllm.data.vqa.build_vqa_dataset`] for why the default is
            after).
        train_samples (`int`, *optional*, defaults to `20000`):
            Generated training question-answer pairs.
        test_samples (`int`, *optional*, defaults to `1000`):
            Generated test pairs (the final evaluation).
        curve_samples (`int`, *optional*, defaults to `250`):
            Test pairs evaluated at each curve checkpoint.
        curve_points (`int`, *optional*, defaults to `8`):
            Checkpoints of the accuracy-vs-time curve.
        learning_rate (`float`, *optional*, defaults to `3e-4`):
            AdamW peak learning rate (see `benchmarks/README.md`, "Learnability: what was tried").
        warmup_steps (`int`, *optional*, defaults to `100`):
            Linear warm-up, then cosine decay.
        batch_size (`int`, *optional*, defaults to `32`):
            Samples per optimizer step.
        max_steps (`int`, *optional*, defaults to `2000`):
            Optimizer steps of each run.
        logging_steps (`int`, *optional*, defaults to `50`):
            Loss logging interval.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weights, the data order and the data.
        threads (`int`, *optional*, defaults to `1`):
            `torch.set_num_threads`. With more, every small operation waits at a thread barrier whenever another
            process holds a core (see `benchmarks/README.md`, "Step benchmark").
        dataloader_workers (`int`, *optional*, defaults to `1`):
            `dataloader_num_workers`: one worker decodes the PNGs and collates the next batch on the second core
            while the step runs (tens of milliseconds per step otherwise).
        token_compressor (`str`, *optional*, defaults to `"divprune"`):
            The sparse run's token compressor.
        keep_ratio (`float`, *optional*, defaults to `0.25`):
            The sparse run's fraction of visual tokens kept on fast steps.
        slow_mode_prob (`float`, *optional*, defaults to `0.1`):
            The sparse run's share of slow steps.
        num_isolator_tokens (`int`, *optional*, defaults to `4`):
            The sparse run's mode isolator length.
        eval_batch_size (`int`, *optional*, defaults to `100`):
            Prompts per `generate` call in the evaluations.

    Example:

    ```python
    >>> from benchmarks.harness.presets import DemoConfig
    >>> config = DemoConfig(max_steps=10)
    >>> config.sparse_config().keep_ratio, config.to_dict()["hidden_size"]
    (0.25, 128)
    >>> DemoConfig.from_dict(config.to_dict()) == config
    True

    ```
    """

    model: TinyLlavaPreset = DEMO_MODEL
    family: str = "llava"
    cell_size: int = 16
    max_objects: int = 5
    families: tuple[str, ...] | None = None
    border: int = 1
    image_first: bool = False
    train_samples: int = 20_000
    test_samples: int = 1_000
    curve_samples: int = 250
    curve_points: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    batch_size: int = 32
    max_steps: int = 2000
    logging_steps: int = 50
    seed: int = 0
    threads: int = 1
    dataloader_workers: int = 1
    token_compressor: str | None = "divprune"
    keep_ratio: float = 0.25
    slow_mode_prob: float = 0.1
    num_isolator_tokens: int = 4
    eval_batch_size: int = 100

    def __post_init__(self):
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"family must be one of {sorted(MODEL_FAMILIES)}, got {self.family!r}.")

    @property
    def token_size(self) -> int:
        """Pixels per side of one visual token: a patch, or (Qwen2-VL) 2 x 2 merged patches."""
        return self.model.patch_size * MODEL_FAMILIES[self.family]["merge"]

    @property
    def num_visual_tokens(self) -> int:
        return (self.model.image_size // self.token_size) ** 2

    @property
    def kept_visual_tokens(self) -> int:
        """Visual tokens per image on the sparse run's fast steps: its compressor's own budget (`pool`'s follows from
        its stride on the patch grid, not `round(keep_ratio * N)`); all of them without a compressor.

        ```python
        >>> from benchmarks.harness.presets import DemoConfig
        >>> DemoConfig(keep_ratio=0.1).kept_visual_tokens
        6
        >>> DemoConfig(token_compressor="pool", keep_ratio=0.1).kept_visual_tokens  # stride 3 on the 8 x 8 grid
        9

        ```
        """
        if self.token_compressor is None:
            return self.num_visual_tokens
        side = self.model.image_size // self.token_size
        return get_compressor(self.token_compressor).budget(
            num_tokens=self.num_visual_tokens, keep_ratio=self.keep_ratio, grid_size=(side, side)
        )

    def with_model(self, **changes) -> DemoConfig:
        """A copy whose model preset has `changes` (fields of [`~hf_sparse_mllm.tiny.TinyLlavaPreset`])."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    def sparse_config(self, **overrides) -> SparseMLLMConfig:
        """The sparse run's `SparseMLLMConfig` (instruction stage, this run's seed), with `overrides` applied."""
        recipe = dict(
            token_compressor=self.token_compressor,
            keep_ratio=self.keep_ratio,
            slow_mode_prob=self.slow_mode_prob,
            num_isolator_tokens=self.num_isolator_tokens,
            stage="instruction",
            seed=self.seed,
        )
        recipe.update(overrides)
        return SparseMLLMConfig(**recipe)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as one flat dict (the `config` of reports and results files): the model's fields,
        then the others."""
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return {**dataclasses.asdict(self.model), **rest}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> DemoConfig:
        """The configuration of a flat dict written by [`~DemoConfig.to_dict`]; missing keys take their defaults.

        Raises `ValueError` naming the keys that are neither a field of `DemoConfig` nor of its model preset.
        """
        model_fields = {f.name for f in dataclasses.fields(TinyLlavaPreset)}
        own_fields = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(record) - model_fields - own_fields)
        if unknown:
            raise ValueError(f"Unknown DemoConfig keys {unknown}; known: {sorted(model_fields | own_fields)}.")
        own = {k: v for k, v in record.items() if k in own_fields}
        if own.get("families") is not None:
            own["families"] = tuple(own["families"])  # JSON stores the tuple as a list
        defaults = dataclasses.asdict(DEMO_MODEL)
        model = TinyLlavaPreset(**{k: record.get(k, defaults[k]) for k in defaults})
        return cls(model=model, **own)


DEMO_PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    # The accuracy benchmark (`make bench-accuracy`): 144 visual tokens, at most 5 of them objects, so the language
    # model's share of a step is large enough for compression to show its speed-up.
    "bench": DemoConfig(model=dataclasses.replace(DEMO_MODEL, image_size=192), max_steps=3000),
    # The combined recipe (token compression + DualSpeed + layer skipping): a 4-layer decoder, so that with the first
    # and last layer protected there are layers to skip; deeper, the decoder's share of a step grows too.
    "bench-deep": DemoConfig(model=dataclasses.replace(DEMO_MODEL, image_size=192, num_hidden_layers=4)),
    # The combined recipe with 8 decoder layers: the language model dominates the step (the baseline takes more than
    # twice as long as with 4), and skipping a layer is an eighth of the depth, not a quarter.
    "bench-deep8": DemoConfig(model=dataclasses.replace(DEMO_MODEL, image_size=192, num_hidden_layers=8)),
    # An M-RoPE model (`make bench-accuracy-qwen2vl`): a tiny Qwen2-VL on the demo's data, 8 px patches merged 2 x 2,
    # so each visual token covers one 16 px scene cell as the LLaVA presets' patches do (64 tokens).
    "bench-qwen2vl": DemoConfig(model=dataclasses.replace(DEMO_MODEL, patch_size=8), family="qwen2_vl"),
    # A smoke run (tests, `--quick`): the demo's model at 64 px (16 visual tokens) and narrower, a few steps, seconds.
    "quick": DemoConfig(
        model=dataclasses.replace(
            DEMO_MODEL, image_size=64, hidden_size=32, intermediate_size=64, vision_hidden_size=16
        ),
        train_samples=64,
        test_samples=24,
        curve_samples=8,
        curve_points=2,
        batch_size=8,
        max_steps=3,
        dataloader_workers=0,
        warmup_steps=1,
        logging_steps=1,
        eval_batch_size=16,
    ),
}


def build_model(config: DemoConfig):
    """The tiny model of `config.family` and its processor (weights seeded by `config.seed`, the VQA data's
    vocabulary).

    ```python
    >>> import dataclasses
    >>> from benchmarks.harness.presets import DEMO_PRESETS, build_model
    >>> model, processor = build_model(DEMO_PRESETS["quick"])
    >>> model.config.image_seq_length
    16
    >>> qwen = dataclasses.replace(DEMO_PRESETS["quick"], family="qwen2_vl").with_model(patch_size=8)
    >>> model, processor = build_model(qwen)
    >>> model.config.model_type, qwen.num_visual_tokens
    ('qwen2_vl', 16)

    ```
    """
    if config.family == "llava":
        return build_tiny_llava_and_processor(config.model, words=vqa_vocabulary(), seed=config.seed)
    shape = config.model
    pixels = shape.image_size**2  # the generated images keep their size
    return build_tiny_qwen2_vl(
        words=vqa_vocabulary(),
        seed=config.seed,
        patch_size=shape.patch_size,
        min_pixels=pixels,
        max_pixels=pixels,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        vision_hidden_size=shape.vision_hidden_size,
        vision_layers=shape.vision_layers,
    )


def describe_model(config: dict[str, Any]) -> str:
    """The model and its visual tokens in words, from a results file's flat `config` (files written before `family`
    existed are LLaVA's).

    ```python
    >>> from benchmarks.harness.presets import DEMO_PRESETS, describe_model
    >>> model, tokens = describe_model(DEMO_PRESETS["bench-qwen2vl"].to_dict()).split(": ")
    >>> model
    'Tiny Qwen2-VL (Qwen2-VL tower 1 x 32, M-RoPE decoder 2 x 128)'
    >>> tokens
    '128 px images, 8 px patches merged 2 x 2 = 64 visual tokens'

    ```
    """
    family = MODEL_FAMILIES[config.get("family", "llava")]
    merge = family["merge"]
    tokens = (config["image_size"] // (config["patch_size"] * merge)) ** 2
    merged = f" merged {merge} x {merge}" if merge > 1 else ""
    return (
        f"Tiny {family['label']} ({family['tower']} {config['vision_layers']} x {config['vision_hidden_size']}, "
        f"{family['decoder']} {config['num_hidden_layers']} x {config['hidden_size']}): {config['image_size']} px "
        f"images, {config['patch_size']} px patches{merged} = {tokens} visual tokens"
    )

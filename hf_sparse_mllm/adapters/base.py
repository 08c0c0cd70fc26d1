"""Architecture adapters: what compressed training and inference need to know about one model family.

An adapter describes a batch's visual tokens before the forward, as *placeholder runs* (the contiguous spans of image
placeholder tokens in `input_ids`, one per image or per tile) divided into *visual units* (groups of tokens that are
compressed together, with one budget and, where they have one, a patch grid). It also names the seam where the
projected features come out (by default `get_image_features(...).pooler_output` of the model's base module, which
every family in `transformers` scatters into the placeholders in order) and, for M-RoPE families, computes the
full-sequence 3-D positions that kept tokens keep. Everything else (shortening the sequence, selecting, re-assembling
the features, gathering positions) is [`hf_sparse_mllm.sparse_forward`], the same for every family.

A new architecture is one file: subclass [`ArchitectureAdapter`], override what differs, decorate it with
[`register_adapter`]. The defaults find the parts of a model generically (`get_decoder()`, `get_output_embeddings()`,
`config.get_text_config()`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import model_parts
from .._names import refuse_taken

_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(*model_types: str) -> Callable[[type[ArchitectureAdapter]], type[ArchitectureAdapter]]:
    """Class decorator registering an adapter for one or more `config.model_type` values.

    Example:

    ```python
    >>> from hf_sparse_mllm.adapters import ArchitectureAdapter, register_adapter, supported_model_types
    >>> @register_adapter("docs_vlm")
    ... class DocsAdapter(ArchitectureAdapter):
    ...     pass
    >>> "docs_vlm" in supported_model_types()
    True

    ```
    """

    def wrap(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        remedy = (
            f"adapters are looked up by `config.model_type`, so register {cls.__name__} for the model_type of a model "
            "class of your own."
        )
        for model_type in model_types:
            refuse_taken(
                _ADAPTERS, model_type, cls, kind="Adapter model_type", decorator="register_adapter", remedy=remedy
            )
            _ADAPTERS[model_type] = cls
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type[ArchitectureAdapter]:
    """The adapter class registered for `model_type` (a `KeyError` if none is), without building a model.

    Example:

    ```python
    >>> from hf_sparse_mllm.adapters import ArchitectureAdapter, adapter_class
    >>> adapter_class("qwen2_vl").__name__, adapter_class("llava").full_position_ids is ArchitectureAdapter.full_position_ids
    ('QwenVLAdapter', True)

    ```
    """
    return _ADAPTERS[model_type]


def has_adapter(model: nn.Module) -> bool:
    return _model_type(model) in _ADAPTERS


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """Return the adapter for `model` (a `PreTrainedModel`, or a PEFT model around one).

    Raises a `ValueError` naming the supported architectures and how to add one.
    """
    model = model_parts.base_model(model)
    model_type = _model_type(model)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"Visual token compression has no architecture adapter for model_type {model_type!r} "
            f"({type(model).__name__}). Supported architectures: {supported_model_types()}. Without compression "
            "(token_compressor=None) any model trains; to compress this one, write an adapter (one file, see "
            "docs/adding_an_architecture.md) and register it with @hf_sparse_mllm.adapters.register_adapter"
            f"({model_type!r}). Where each image (or tile) is one run of `config.image_token_id` placeholders, "
            "filled in order by `get_image_features(...).pooler_output`, with 1-D positions, the base class is "
            f"enough: hf_sparse_mllm.adapters.register_adapter({model_type!r})(ArchitectureAdapter)."
        )
    return _ADAPTERS[model_type](model)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@dataclass(frozen=True)
class PlaceholderRun:
    """A contiguous span of image placeholder tokens that one image (or one tile) fills.

    Args:
        row (`int`): batch row.
        start (`int`): position of the run's first placeholder in the row.
        length (`int`): number of placeholders (= visual tokens of the image or tile).
        image (`int`): index of the image it belongs to (images counted over the batch in order).
    """

    row: int
    start: int
    length: int
    image: int


@dataclass(frozen=True)
class VisualUnit:
    """Visual tokens compressed together, with one budget.

    Args:
        run (`int`): index of its [`PlaceholderRun`] in the layout.
        offsets (`torch.LongTensor`): the unit's token offsets within the run, in raster order.
        grid (`tuple[int, int]` or `None`): `(rows, cols)` of the unit's tokens in raster order, if it is a grid.
        compress (`bool`): `False` for tokens always kept in place (e.g. LLaVA-NeXT's `image_newline` rows).
    """

    run: int
    offsets: torch.Tensor
    grid: tuple[int, int] | None = None
    compress: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class VisualLayout:
    """The visual tokens of one batch: its placeholder runs (in the order their features come out of the model) and
    the units they are divided into."""

    runs: list[PlaceholderRun]
    units: list[VisualUnit]

    @property
    def num_images(self) -> int:
        return len({run.image for run in self.runs})


def whole_run_units(runs: list[PlaceholderRun], grids: list[tuple[int, int] | None] | None = None) -> list[VisualUnit]:
    """One unit per run, covering it all (the layout of most families)."""
    grids = grids or [None] * len(runs)
    return [VisualUnit(i, torch.arange(run.length), grid) for i, (run, grid) in enumerate(zip(runs, grids))]


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else None


class ArchitectureAdapter:
    """Base class: per-architecture knowledge for compressed training and inference.

    Subclasses override [`~ArchitectureAdapter.run_lengths`] (how many visual tokens each image or tile has, from
    the batch's own metadata) and [`~ArchitectureAdapter.units`] (how runs divide into units, with their grids) where
    the defaults do not fit, and [`~ArchitectureAdapter.full_position_ids`] for M-RoPE families.

    Attributes:
        selected_outputs (`tuple[str, ...]`): other fields of `get_image_features`' output that hold per-token
            features aligned with `pooler_output` (e.g. Qwen3-VL's `deepstack_features`); they follow the selection.
        visual_inputs (`tuple[str, ...]`): batch keys of image inputs, never gathered with the tokens when the
            sequence is shortened, even where their first two sizes happen to be `(batch, seq)` (e.g. Gemma 4's
            `(images, patches, ...)` `image_position_ids`).
    """

    selected_outputs: tuple[str, ...] = ()
    visual_inputs: tuple[str, ...] = ("pixel_values", "pixel_attention_mask", "pixel_values_videos")

    def __init__(self, model: nn.Module):
        self.model = model_parts.base_model(model)

    # -- facts about the architecture --------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def image_token_id(self) -> int:
        config = self.config
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config.get_text_config(), "pad_token_id", None)
        if pad is None:
            pad = getattr(self.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def feature_module(self) -> nn.Module:
        """The module whose forward calls `self.get_image_features(...)` and scatters its `pooler_output`."""
        return self.model.base_model

    def decoder(self) -> nn.Module:
        return model_parts.decoder(self.model)

    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def language_model(self) -> nn.Module:
        return self.decoder()

    def input_embeddings(self) -> nn.Module:
        """The token embeddings, which the model's forward runs first, before the vision modules."""
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def hidden_size(self) -> int:
        return model_parts.text_hidden_size(self.model)

    # -- the batch's visual tokens ------------------------------------------------------------------------------
    def run_lengths(self, inputs: dict) -> list[int] | None:
        """Visual tokens of each image (or tile) of the batch, in order, from its metadata; `None` when only the
        placeholders themselves tell (each maximal placeholder span is then one run)."""
        return None

    def images_of_runs(self, inputs: dict, num_runs: int) -> list[int]:
        """The image each run belongs to (default: every run is an image of its own)."""
        return list(range(num_runs))

    def units(self, inputs: dict, runs: list[PlaceholderRun]) -> list[VisualUnit]:
        """Divide the runs into units (default: one unit per run, a square grid where the count is square)."""
        return whole_run_units(runs, [square_grid(run.length) for run in runs])

    def layout(self, inputs: dict) -> VisualLayout:
        """The batch's [`VisualLayout`], checked against its images: a mismatch is a `ValueError` naming the rows."""
        return self.make_layout(inputs, self.run_lengths(inputs), self.units)

    def placeholder_mask(self, inputs: dict) -> torch.Tensor:
        """`(batch, seq)`: where the batch's image placeholders are (default: `input_ids == image_token_id`)."""
        return inputs["input_ids"] == self.image_token_id

    def make_layout(self, inputs: dict, lengths: list[int] | None, units_of) -> VisualLayout:
        """Cut the placeholder spans into runs of `lengths` (the spans themselves when `None`) and divide them into
        units with `units_of(inputs, runs)`."""
        mask = self.placeholder_mask(inputs)
        spans = [(row, start, length) for row in range(mask.shape[0]) for start, length in _true_runs(mask[row])]
        if lengths is None:
            lengths = [length for _, _, length in spans]
        runs = _split_spans(spans, lengths, self.image_token_id)
        images = self.images_of_runs(inputs, len(runs))
        runs = [PlaceholderRun(row, start, length, image) for (row, start, length), image in zip(runs, images)]
        return VisualLayout(runs, units_of(inputs, runs) if runs else [])

    def isolator_runs(self, layout: VisualLayout) -> list[bool]:
        """Whether the mode isolator precedes each run's kept tokens in fast mode (default: every run's)."""
        return [True] * len(layout.runs)

    def full_position_ids(self, inputs: dict) -> torch.Tensor | None:
        """M-RoPE families: the `(3, batch, seq)` position ids of the full (uncompressed) batch; `None` for 1-D
        positions (the shortened sequence then gets contiguous positions, as the language model sees it)."""
        return None

    # -- what some compressors need --------------------------------------------------------------------------
    def context_hooks(self, needs: frozenset[str], context: dict) -> list:
        """Install hooks that fill `context[name]` with one `(num_tokens,)` score row per unit for each name a
        compressor `requires` (e.g. `cls_attention`); return their handles."""
        if needs:
            raise ValueError(
                f"The token compressor needs {sorted(needs)}, which {type(self).__name__} cannot provide for "
                f"{type(self.model).__name__}."
            )
        return []

    # -- same modules on every process --------------------------------------------------------------------------
    def dummy_visual_inputs(self) -> dict:
        """Inputs of `get_image_features` for one small blank image, for the zero-contribution pass of a micro-batch
        without images (sharded engines need every process to run the same modules)."""
        vision = getattr(self.config, "vision_config", None)
        size = getattr(vision, "image_size", None)
        channels = getattr(vision, "num_channels", 3)
        if size is None:
            raise NotImplementedError(f"{type(self).__name__} does not know how to build a dummy image.")
        size = size if isinstance(size, int) else size[0]
        # Ones, not zeros: some families (Idefics3) drop all-zero images as padding.
        return {"pixel_values": torch.ones(1, channels, size, size)}


def _true_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of every run of consecutive True values in a 1-D boolean tensor."""
    if not bool(mask.any()):
        return []
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).to(torch.int8)
    diff = padded[1:] - padded[:-1]
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _split_spans(spans, lengths, image_token_id) -> list[tuple[int, int, int]]:
    """Cut the placeholder spans into runs of the given lengths, in order (adjacent images share a span)."""
    runs, queue = [], list(lengths)
    for row, start, length in spans:
        cursor = start
        while cursor < start + length:
            if not queue or queue[0] > start + length - cursor:
                raise ValueError(_mismatch(spans, lengths, image_token_id, row))
            runs.append((row, cursor, queue[0]))
            cursor += queue.pop(0)
    if queue:
        raise ValueError(_mismatch(spans, lengths, image_token_id, None))
    return runs


def _mismatch(spans, lengths, image_token_id, row) -> str:
    where = f" (first mismatch in batch row {row})" if row is not None else ""
    return (
        f"The batch has {sum(s[2] for s in spans)} image placeholder tokens (id {image_token_id}) in spans "
        f"{[(r, length) for r, _, length in spans]} (row, length), but its images have "
        f"{sum(lengths)} visual tokens in runs of {lengths}{where}. Build the prompts with the model's processor "
        "so that every image is expanded to its full number of placeholder tokens, and do not truncate inside "
        "an image."
    )

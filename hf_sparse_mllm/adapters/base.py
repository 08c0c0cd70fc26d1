"""Architecture adapters: what the trainer needs to know about one model family, kept out of the trainer.

An adapter answers three questions for its architecture: how many placeholder tokens an image has in the prompt,
where to intercept the projected visual features (to compress them and prepend the mode isolator), and where the
decoder layers and the LM head live. The trainer always runs the *wrapped* model (DDP/FSDP/DeepSpeed); adapters
only install temporary hooks on submodules of the unwrapped one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(*model_types: str) -> Callable[[type[ArchitectureAdapter]], type[ArchitectureAdapter]]:
    """Class decorator registering an adapter for one or more `config.model_type` values."""

    def wrap(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        for model_type in model_types:
            if model_type in _ADAPTERS:
                raise ValueError(
                    f"An adapter for model_type {model_type!r} is already registered ({_ADAPTERS[model_type].__name__})."
                )
            _ADAPTERS[model_type] = cls
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """Return the adapter for `model` (an unwrapped `PreTrainedModel`), or raise a `ValueError` naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"SparseMLLMTrainer has no architecture adapter for model_type {model_type!r} "
            f"({type(model).__name__}). Supported architectures: {supported_model_types()}."
        )
    return _ADAPTERS[model_type](model)


@dataclass
class SparsePlan:
    """What one forward pass does to the visual tokens and the LM head, consumed by the adapter's hooks.

    Args:
        compress (`Callable` or `None`): maps projected features `(num_images, num_tokens, dim)` and a context dict
            to the kept features `(num_images, k, dim)`; `None` keeps every token.
        isolator (`nn.Module` or `None`): called on the kept features `(num_images, k, dim)`; returns them with the
            mode-isolator tokens prepended to every image (a module call, so sharded parameters are gathered).
        logit_positions (`torch.Tensor` or `None`): boolean `(batch, seq)` mask; when set, the LM head only sees the
            hidden states at these positions (flattened to `(1, P, hidden)`), which saves the vocabulary projection of
            every other position.
    """

    compress: Callable[[torch.Tensor, dict], torch.Tensor] | None = None
    isolator: nn.Module | None = None
    logit_positions: torch.Tensor | None = None
    needs: frozenset[str] = frozenset()
    record: dict = field(default_factory=dict)


class ArchitectureAdapter:
    """Base class. Subclasses set the module paths and override what differs for their architecture."""

    def __init__(self, model: nn.Module):
        self.model = model

    # -- facts about the architecture ---------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        raise NotImplementedError

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def grid_size(self) -> tuple[int, int] | None:
        return None

    def projector(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def hidden_size(self) -> int:
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def num_images(self, inputs: dict) -> int:
        pixel_values = inputs.get("pixel_values")
        return 0 if pixel_values is None else int(pixel_values.shape[0])

    # -- batch checks and rewriting -----------------------------------------------------------------------------
    def check_batch(self, inputs: dict) -> None:
        """Raise a clear `ValueError` when the image placeholders do not match the images in the batch."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            return
        n_tokens = int((input_ids == self.image_token_id).sum())
        n_images = self.num_images(inputs)
        per_image = self.tokens_per_image()
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"The batch has {n_tokens} image placeholder tokens (id {self.image_token_id}) but {n_images} images "
                f"of {per_image} visual tokens each (expected {n_images * per_image}). Build the prompts with the "
                "model's processor so that every image is expanded to its full number of placeholder tokens."
            )

    def shrink_image_spans(self, inputs: dict, new_tokens_per_image: int) -> dict:
        """Return a copy of `inputs` in which every image's placeholder span has `new_tokens_per_image` tokens."""
        return shrink_image_spans(
            inputs,
            image_token_id=self.image_token_id,
            tokens_per_image=self.tokens_per_image(),
            new_tokens_per_image=new_tokens_per_image,
            pad_token_id=self.pad_token_id,
        )

    # -- hooks ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def apply(self, plan: SparsePlan) -> Iterator[SparsePlan]:
        """Install the plan's hooks for the duration of one forward pass through the (wrapped) model."""
        handles = []
        context: dict = {"grid_size": self.grid_size()}
        if plan.compress is not None or plan.isolator is not None:
            handles += self._context_hooks(plan.needs, context)

            def on_projector_output(module, args, output):
                features = output
                if plan.compress is not None:
                    features = plan.compress(features, context)
                plan.record["kept_tokens_per_image"] = features.shape[1]
                if plan.isolator is not None:
                    features = plan.isolator(features)
                return features

            handles.append(self.projector().register_forward_hook(on_projector_output))
        if plan.logit_positions is not None:
            positions = plan.logit_positions

            def on_lm_head_input(module, args):
                hidden = args[0]
                return (hidden[positions.to(hidden.device)].unsqueeze(0),) + tuple(args[1:])

            handles.append(self.lm_head().register_forward_pre_hook(on_lm_head_input))
        try:
            yield plan
        finally:
            for handle in handles:
                handle.remove()

    def _context_hooks(self, needs: frozenset[str], context: dict) -> list:
        """Hooks that fill `context` with what a compressor declared it needs (e.g. CLS attention)."""
        if needs:
            raise ValueError(
                f"{type(self).__name__} cannot provide {sorted(needs)} to the token compressor for this architecture."
            )
        return []


def _image_runs(is_image: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of every run of consecutive True values in a 1-D boolean tensor."""
    if not bool(is_image.any()):
        return []
    padded = torch.cat([is_image.new_zeros(1), is_image, is_image.new_zeros(1)]).to(torch.int8)
    diff = padded[1:] - padded[:-1]
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def shrink_image_spans(
    inputs: dict,
    *,
    image_token_id: int,
    tokens_per_image: int,
    new_tokens_per_image: int,
    pad_token_id: int,
) -> dict:
    """Rebuild a padded batch so that each image's run of `tokens_per_image` placeholders has `new_tokens_per_image`.

    Every `(batch, seq)` tensor in `inputs` (`input_ids`, `attention_mask`, `labels`, token-type ids, ...) is gathered
    with the same index, so text tokens keep their order and values and an image span's attention-mask and label
    values (all equal inside a span) are kept. Rows whose length changes differently (different numbers of images)
    are re-padded on the side the batch was padded on. `position_ids`, if present, are rebuilt contiguously from the
    attention mask: the shortened sequence is what the language model sees.
    """
    input_ids = inputs["input_ids"]
    batch, seq_len = input_ids.shape
    is_image = input_ids == image_token_id
    row_indices = []
    for row in range(batch):
        pieces, cursor = [], 0
        for start, length in _image_runs(is_image[row]):
            if length % tokens_per_image:
                raise ValueError(
                    f"Row {row} has a run of {length} image placeholder tokens, not a multiple of the {tokens_per_image} "
                    "tokens an image has: the prompt does not match the image features."
                )
            pieces.append(torch.arange(cursor, start))
            for image in range(length // tokens_per_image):
                pieces.append(torch.full((new_tokens_per_image,), start + image * tokens_per_image))
            cursor = start + length
        pieces.append(torch.arange(cursor, seq_len))
        row_indices.append(torch.cat(pieces).to(input_ids.device))

    new_len = max(len(index) for index in row_indices)
    attention_mask = inputs.get("attention_mask")
    left_padded = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    pad_values = {"input_ids": pad_token_id, "labels": -100}
    out = dict(inputs)
    for key, value in inputs.items():
        if key == "position_ids" or not (isinstance(value, torch.Tensor) and value.shape[:2] == (batch, seq_len)):
            continue
        rows = []
        for row, index in enumerate(row_indices):
            gathered = value[row, index]
            missing = new_len - len(index)
            if missing:
                filler = gathered.new_full((missing, *gathered.shape[1:]), pad_values.get(key, 0))
                gathered = torch.cat([filler, gathered] if left_padded else [gathered, filler])
            rows.append(gathered)
        out[key] = torch.stack(rows)
    if out.get("attention_mask") is not None:
        # Columns that are padding in every row only cost compute.
        used = out["attention_mask"].bool().any(0).nonzero().flatten()
        if len(used) and (used[0] > 0 or used[-1] < new_len - 1):
            lo, hi = int(used[0]), int(used[-1]) + 1
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.shape[:2] == (batch, new_len) and key != "position_ids":
                    out[key] = value[:, lo:hi]
    if "position_ids" in inputs:
        mask = out.get("attention_mask", torch.ones_like(out["input_ids"]))
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return out

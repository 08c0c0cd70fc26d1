"""The compressed forward: the same code for training (fast steps, and the teacher of slow steps) and for compressed
inference, on every architecture with an adapter.

Before the forward, [`compress_batch`] shortens every placeholder run of the batch to its budget (per visual unit,
`round(keep_ratio * N_u)` or `num_keep` capped at `N_u`, plus the mode-isolator tokens) and gathers every per-token
tensor with it. During the forward, [`sparse_hooks`] intercepts the projected features where the adapter says they
come out, selects the kept tokens unit by unit (units with the same size, grid and budget in one batched call),
prepends the isolator to each run (or to those the adapter's `isolator_runs` marks) and hands the model exactly as
many features as there are placeholders left. For M-RoPE models the kept tokens get their positions in the full
sequence, gathered after the selection.

```python
>>> from PIL import Image
>>> from hf_sparse_mllm.adapters import get_adapter
>>> from hf_sparse_mllm.compressors import get_compressor
>>> from hf_sparse_mllm.data.collator import VisionLanguageCollator
>>> from hf_sparse_mllm.sparse_forward import Compression, compress_batch, sparse_hooks
>>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
>>> model, processor = build_tiny_llava_and_processor("test", words=["red", "what", "color"])
>>> sample = {"images": [Image.new("RGB", (32, 32), "red")], "messages": [
...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
...     {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
>>> batch = VisionLanguageCollator(processor)([sample])
>>> adapter, compression = get_adapter(model), Compression(get_compressor("divprune"), keep_ratio=0.25)
>>> short = compress_batch(adapter, batch, compression)
>>> short.kept, batch["input_ids"].shape[1] - short.inputs["input_ids"].shape[1]
([4], 12)
>>> with sparse_hooks(adapter, short, compression):
...     logits = model(**{k: v for k, v in short.inputs.items() if k != "labels"}).logits
>>> logits.shape[1] == short.inputs["input_ids"].shape[1]
True

```
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ArchitectureAdapter, VisualLayout
from .compressors import TokenCompressor


@dataclass
class Compression:
    """How a compressed forward selects visual tokens.

    Args:
        compressor ([`~hf_sparse_mllm.compressors.TokenCompressor`]): the selection method.
        keep_ratio (`float`, *optional*, defaults to `1.0`): fraction kept per visual unit.
        num_keep (`int`, *optional*): tokens kept per unit (capped at the unit's size); overrides `keep_ratio`.
        seed (`int`, *optional*, defaults to `0`): seed of the generator handed to stochastic compressors.
        isolator (`nn.Module`, *optional*): the mode isolator, prepended to the kept tokens of every run the
            adapter's `isolator_runs` marks (fast mode).
    """

    compressor: TokenCompressor
    keep_ratio: float = 1.0
    num_keep: int | None = None
    seed: int = 0
    isolator: nn.Module | None = None

    @property
    def num_isolator_tokens(self) -> int:
        return 0 if self.isolator is None else int(self.isolator.num_tokens)

    def budget(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        num_keep = None if self.num_keep is None else min(self.num_keep, num_tokens)
        try:
            return self.compressor.budget(
                num_tokens=num_tokens, keep_ratio=self.keep_ratio, num_keep=num_keep, grid_size=grid
            )
        except ValueError as error:
            raise ValueError(
                f"Token compressor {self.compressor.name!r} cannot compress a visual unit of {num_tokens} tokens "
                f"(grid {grid}): {error}"
            ) from None


@dataclass
class CompressedBatch:
    """A batch shortened for a compressed forward.

    Args:
        inputs (`dict`): the shortened model inputs (labels too, when the batch had them).
        layout ([`~hf_sparse_mllm.adapters.VisualLayout`]): the original batch's visual tokens.
        budgets (`list[int]`): tokens kept per unit of the layout.
        kept (`list[int]`): visual tokens kept per run, without the isolator.
        isolators (`list[int]`): isolator tokens at the start of each run (the adapter's `isolator_runs`).
        index_map (`torch.LongTensor`): `(batch, new_seq)`, for every token of the shortened batch the position in the
            original row it stands for (`-1` for padding); the slots of a run all point at its first placeholder.
        run_slots (`list[tuple[int, int]]`): per run, its row and the position of its first slot in the shortened row.
        full_position_ids (`torch.Tensor` or `None`): M-RoPE positions of the original batch.
        selection (`list[torch.LongTensor]`): per run, the kept token offsets (set by the forward).
    """

    inputs: dict
    layout: VisualLayout
    budgets: list[int]
    kept: list[int]
    isolators: list[int]
    index_map: torch.Tensor
    run_slots: list[tuple[int, int]]
    full_position_ids: torch.Tensor | None = None
    selection: list[torch.Tensor] = field(default_factory=list)

    @property
    def visual_tokens_per_image(self) -> float:
        return sum(self.kept) / max(self.layout.num_images, 1)

    def position_ids(self, selection: list[torch.Tensor] | None = None) -> torch.Tensor:
        """M-RoPE positions of the shortened batch: text and kept image tokens keep their full-sequence positions,
        isolator tokens take the position of their run's first patch. `selection` defaults to the forward's."""
        selection = self.selection if selection is None else selection
        index = self.index_map.clone()
        for run, (row, slot), iso, offsets in zip(self.layout.runs, self.run_slots, self.isolators, selection):
            index[row, slot + iso : slot + iso + len(offsets)] = run.start + offsets.to(index.device)
        full = self.full_position_ids
        gathered = full.gather(2, index.clamp(min=0).to(full.device).unsqueeze(0).expand(full.shape[0], -1, -1))
        return gathered.masked_fill((index < 0).to(full.device).unsqueeze(0), 0)


def compress_batch(
    adapter: ArchitectureAdapter, inputs: dict, compression: Compression, layout: VisualLayout | None = None
) -> CompressedBatch:
    """Shorten every placeholder run of `inputs` to its budget plus the isolator tokens (see the module docstring).

    `layout` is `adapter.layout(inputs)`, when the caller has it already.
    """
    layout = adapter.layout(inputs) if layout is None else layout
    budgets = [
        unit.num_tokens if not unit.compress else compression.budget(unit.num_tokens, unit.grid)
        for unit in layout.units
    ]
    kept = [0] * len(layout.runs)
    for unit, budget in zip(layout.units, budgets):
        kept[unit.run] += budget
    full_positions = inputs.get("position_ids")
    if full_positions is None or full_positions.dim() != 3:
        full_positions = adapter.full_position_ids(inputs)
    flags = adapter.isolator_runs(layout)
    if flags and not flags[0]:
        raise ValueError(f"{type(adapter).__name__}.isolator_runs must put the isolator before the first run.")
    isolators = [compression.num_isolator_tokens * first for first in flags]
    lengths = [k + iso for k, iso in zip(kept, isolators)]
    shortened, index_map, run_slots = shorten_runs(
        inputs, layout, lengths, adapter.pad_token_id, visual_inputs=adapter.visual_inputs
    )
    batch = CompressedBatch(shortened, layout, budgets, kept, isolators, index_map, run_slots, full_positions)
    if full_positions is not None:
        # Provisional (the first tokens of each run): the language model gets the selected ones (`sparse_hooks`).
        shortened["position_ids"] = batch.position_ids([torch.arange(k) for k in kept])
    return batch


def shorten_runs(
    inputs: dict,
    layout: VisualLayout,
    new_lengths: list[int],
    pad_token_id: int,
    visual_inputs: tuple[str, ...] = (),
):
    """Gather every per-token tensor (a `(batch, seq, ...)` one not named in `visual_inputs`) so that run `r` has
    `new_lengths[r]` slots; re-pad; drop all-padding columns."""
    input_ids = inputs["input_ids"]
    batch, seq_len = input_ids.shape
    by_row = defaultdict(list)
    for index, run in enumerate(layout.runs):
        by_row[run.row].append(index)
    rows, slots = [], [None] * len(layout.runs)
    for row in range(batch):
        pieces, cursor, length = [], 0, 0
        for index in sorted(by_row[row], key=lambda i: layout.runs[i].start):
            run = layout.runs[index]
            pieces.append(torch.arange(cursor, run.start))
            length += run.start - cursor
            slots[index] = (row, length)
            pieces.append(torch.full((new_lengths[index],), run.start))
            length += new_lengths[index]
            cursor = run.start + run.length
        pieces.append(torch.arange(cursor, seq_len))
        rows.append(torch.cat(pieces))

    new_len = max(len(index) for index in rows)
    attention_mask = inputs.get("attention_mask")
    left_padded = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    shift = [new_len - len(index) if left_padded else 0 for index in rows]
    index_map = torch.full((batch, new_len), -1, dtype=torch.long)
    for row, index in enumerate(rows):
        index_map[row, shift[row] : shift[row] + len(index)] = index
    slots = [(row, slot + shift[row]) for row, slot in slots]

    pad_values = {"input_ids": pad_token_id, "labels": -100}
    out = dict(inputs)
    for key, value in inputs.items():
        if _is_per_token(key, value, (batch, seq_len), visual_inputs) and key != "position_ids":
            out[key] = _gather_tokens(value, index_map.to(value.device), pad_values.get(key, 0))
    if out.get("attention_mask") is not None:
        # Columns that are padding in every row only cost compute.
        used = out["attention_mask"].bool().any(0).nonzero().flatten()
        if len(used) and (used[0] > 0 or used[-1] < new_len - 1):
            lo, hi = int(used[0]), int(used[-1]) + 1
            for key, value in out.items():
                if _is_per_token(key, value, (batch, new_len), visual_inputs):
                    out[key] = value[:, lo:hi]
            index_map = index_map[:, lo:hi]
            slots = [(row, slot - lo) for row, slot in slots]
    position_ids = inputs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2:
        # 1-D positions: the language model sees the shortened sequence, numbered contiguously.
        mask = out.get("attention_mask", torch.ones_like(out["input_ids"]))
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return out, index_map, slots


def _is_per_token(key: str, value, shape: tuple[int, int], visual_inputs: tuple[str, ...]) -> bool:
    """Whether `inputs[key]` is a `(batch, seq, ...)` tensor aligned with `input_ids` of `shape` (image inputs never
    are, even when their first two sizes happen to be `shape`)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and tuple(value.shape[:2]) == shape
        and key not in visual_inputs
    )


def _gather_tokens(value: torch.Tensor, index_map: torch.Tensor, pad_value) -> torch.Tensor:
    index = index_map.clamp(min=0)
    expanded = index.view(*index.shape, *([1] * (value.dim() - 2))).expand(*index.shape, *value.shape[2:])
    gathered = value.gather(1, expanded)
    padding = (index_map < 0).view(*index.shape, *([1] * (value.dim() - 2)))
    return gathered.masked_fill(padding, pad_value)


# ---- during the forward ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sparse_hooks(
    adapter: ArchitectureAdapter,
    batch: CompressedBatch | None = None,
    compression: Compression | None = None,
    logit_positions: torch.Tensor | None = None,
    text_only: bool = False,
) -> Iterator[None]:
    """Hooks for one forward through the (possibly DDP/FSDP/DeepSpeed-wrapped) model.

    With `batch` and `compression`, the projected features are compressed to `batch`'s budgets and, for M-RoPE
    models, the language model gets the kept tokens' full-sequence positions. With `logit_positions` (a boolean
    `(batch, seq)` mask of the forward's input), the LM head only sees those positions (flattened to `(1, P, hidden)`),
    which saves the vocabulary projection of every other one. With `text_only` (a micro-batch without images), the
    vision modules still run, on a blank image, where they would run for images (see [`_blank_image_pass`]).
    """
    handles, restore = [], []
    if text_only:
        isolator = compression.isolator if compression is not None else None
        handles.append(adapter.input_embeddings().register_forward_hook(_blank_image_pass(adapter, isolator)))
    elif batch is not None and batch.layout.runs:
        context: dict = {}
        handles += adapter.context_hooks(compression.compressor.requires, context)
        restore.append(
            _replace_image_features(
                adapter, lambda output: _compress_output(output, adapter, batch, compression, context)
            )
        )
        if batch.full_position_ids is not None:
            pending = [True]  # the prompt's forward only: generation's later steps bring their own positions

            def on_language_model(lm, args, kwargs):
                if pending[0] and batch.selection:
                    pending[0] = False
                    kwargs["position_ids"] = batch.position_ids().to(batch.full_position_ids.device)
                return args, kwargs

            handles.append(adapter.language_model().register_forward_pre_hook(on_language_model, with_kwargs=True))
    if logit_positions is not None:

        def on_lm_head_input(module, args):
            hidden = args[0]
            return (hidden[logit_positions.to(hidden.device)].unsqueeze(0),) + tuple(args[1:])

        handles.append(adapter.lm_head().register_forward_pre_hook(on_lm_head_input))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in restore:
            del module.get_image_features


def _replace_image_features(adapter: ArchitectureAdapter, change) -> nn.Module:
    """Make the feature module's `get_image_features` apply `change` to its output, in place; return the module
    (`del module.get_image_features` restores it)."""
    module = adapter.feature_module()
    original = module.get_image_features

    # `wraps` keeps the signature, which `generate` reads to encode the images before the prompt's forward.
    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        output = original(*args, **kwargs)
        change(output)
        return output

    module.get_image_features = get_image_features
    return module


def _compress_output(output, adapter, batch: CompressedBatch, compression: Compression, context: dict) -> None:
    """Replace `output.pooler_output` (and the adapter's `selected_outputs`) by the kept tokens, in place."""
    flat, entry_sizes, kind = _flatten(output.pooler_output)
    layout = batch.layout
    expected = sum(run.length for run in layout.runs)
    if flat.shape[0] != expected:
        raise RuntimeError(
            f"{type(adapter).__name__}: get_image_features returned {flat.shape[0]} visual tokens but the layout "
            f"expects {expected} ({[run.length for run in layout.runs]} per run)."
        )
    starts = torch.tensor([0] + [run.length for run in layout.runs]).cumsum(0)[:-1].tolist()
    chosen, tokens = _select(flat, layout, batch.budgets, compression, context, starts)
    batch.selection = [offsets.cpu() for offsets in chosen]
    sources = [
        torch.cat([torch.full((iso,), start), start + offsets])
        for start, iso, offsets in zip(starts, batch.isolators, batch.selection)
    ]
    tokens = torch.cat(tokens)
    if compression.isolator is not None:
        tokens = compression.isolator(tokens, _isolator_groups(batch))
    sources = torch.cat(sources)
    output.pooler_output = _rebuild(tokens, sources, entry_sizes, kind)
    for name in adapter.selected_outputs:
        levels = getattr(output, name, None)
        if levels is not None:
            setattr(output, name, [_follow(level, sources, batch, compression, layout, starts) for level in levels])


def _isolator_groups(batch: CompressedBatch) -> list[int]:
    """Kept tokens from each run that has the isolator up to the next one: the isolator goes before each group."""
    groups: list[int] = []
    for iso, offsets in zip(batch.isolators, batch.selection):
        if iso or not groups:
            groups.append(0)
        groups[-1] += len(offsets)
    return groups


def _select(flat, layout, budgets, compression, context, starts):
    """Per run, the kept offsets (ascending) and their vectors, from batched compressor calls over groups of units
    with the same size, grid and budget."""
    chosen = [[] for _ in layout.runs]
    vectors = [[] for _ in layout.runs]
    groups = defaultdict(list)
    for index, (unit, budget) in enumerate(zip(layout.units, budgets)):
        if not unit.compress or budget == unit.num_tokens:
            offsets = unit.offsets.to(flat.device)
            chosen[unit.run].append(offsets)
            vectors[unit.run].append(flat[starts[unit.run] + offsets])
        else:
            groups[(unit.num_tokens, unit.grid, budget)].append(index)
    generator = torch.Generator(device="cpu").manual_seed(compression.seed)
    for (_, grid, budget), members in groups.items():
        units = [layout.units[i] for i in members]
        flat_index = torch.stack([starts[u.run] + u.offsets for u in units]).to(flat.device)
        extra = {name: torch.stack([scores[i] for i in members]) for name, scores in context.items()}
        indices, kept = compression.compressor.compress_with_indices(
            flat[flat_index], budget, grid_size=grid, generator=generator, **extra
        )
        for unit, unit_indices, unit_kept in zip(units, indices, kept):
            chosen[unit.run].append(unit.offsets.to(flat.device)[unit_indices])
            vectors[unit.run].append(unit_kept)
    runs_chosen, runs_vectors = [], []
    for offsets, kept in zip(chosen, vectors):
        offsets, order = torch.cat(offsets).sort()
        runs_chosen.append(offsets)
        runs_vectors.append(torch.cat(kept)[order])
    return runs_chosen, runs_vectors


def _flatten(features):
    """`(tokens, dim)` in scatter order, the number of tokens of each entry, and the container kind."""
    if isinstance(features, torch.Tensor):
        if features.dim() == 2:
            return features, [features.shape[0]], "flat"
        return features.reshape(-1, features.shape[-1]), [features.shape[1]] * features.shape[0], "tensor"
    entries = [f.reshape(-1, f.shape[-1]) for f in features]
    return torch.cat(entries), [len(e) for e in entries], type(features)


def _rebuild(tokens: torch.Tensor, sources: torch.Tensor, entry_sizes: list[int], kind):
    """The container `get_image_features` returned, holding `tokens`; each token goes to the entry its source was in."""
    ends = torch.tensor(entry_sizes).cumsum(0)
    counts = torch.bincount(torch.searchsorted(ends, sources, right=True), minlength=len(entry_sizes)).tolist()
    if kind == "flat":
        return tokens
    if kind == "tensor":
        if len(set(counts)) == 1:
            return tokens.view(len(counts), counts[0], tokens.shape[-1])
        return tokens  # unequal entries (a run spans tiles): a flat tensor scatters the same way
    return kind(torch.split(tokens, counts))


def _follow(level, sources, batch, compression, layout, starts):
    """Features aligned with `pooler_output` (e.g. deepstack levels) after the same selection; zeros for isolators."""
    flat, entry_sizes, kind = _flatten(level)
    if compression.compressor.selects:
        runs = [flat[start + offsets.to(flat.device)] for start, offsets in zip(starts, batch.selection)]
    else:  # a reduction that builds new tokens: apply it to these features too
        runs = _select(flat, layout, batch.budgets, compression, {}, starts)[1]
    picked = torch.cat(
        [torch.cat([flat.new_zeros(iso, flat.shape[1]), kept]) for iso, kept in zip(batch.isolators, runs)]
    )
    return _rebuild(picked, sources, entry_sizes, kind)


# ---- a micro-batch without images ------------------------------------------------------------------------------


def _blank_image_pass(adapter: ArchitectureAdapter, isolator: nn.Module | None):
    """A forward hook for the token embeddings that runs the vision tower, the projector and (in fast mode) the
    isolator on one blank image and adds their output, times zero, to the embeddings.

    Sharded engines (FSDP, ZeRO-3) need every process to run the same modules in the same order: where a process's
    micro-batch has images, they run inside the model's forward right after the token embeddings and before the
    language model, once per forward; this runs them at the same place, inside the (wrapped) model's forward, and
    their backward gets zero gradients. Nothing the model computes changes.
    """

    def hook(module, args, embeds):
        parameter = next(adapter.feature_module().parameters())
        dummy = {
            key: value.to(embeds.device, parameter.dtype)
            if torch.is_floating_point(value)
            else value.to(embeds.device)
            for key, value in adapter.dummy_visual_inputs().items()
        }
        output = adapter.feature_module().get_image_features(**dummy, return_dict=True)
        features = _flatten(output.pooler_output)[0][:1]
        if isolator is not None:
            features = isolator(features, [1])
        return embeds + (features.sum() * 0).to(embeds.dtype)

    return hook

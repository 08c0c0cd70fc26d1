"""Redundancy analysis: why a sparse recipe fits a model, measured on a few of the user's own batches."""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import model_parts
from ..adapters import get_adapter, has_adapter
from ..compressors.redundancy import neighbour_redundancy
from .bypass import RedundancyMeter


@dataclass
class RedundancyReport:
    """What [`analyze_redundancy`] measured.

    Args:
        layer_similarity (`list[float]`): per decoder layer, cosine similarity of its input and output hidden states
            (mean over tokens and batches). Near 1: the layer barely changes the residual stream, a skipping candidate.
        visual_token_redundancy (`list[float]`): per visual token position, the mean (over images) of its highest
            cosine similarity to a spatial neighbour of the projected features. Near 1: background-like, removable.
        grid_size (`tuple[int, int]` or `None`): the patch grid of the visual tokens (the most common one, where
            visual units have several).
        num_images (`int`): visual units (images, or tiles) with that grid seen.
    """

    layer_similarity: list[float]
    visual_token_redundancy: list[float]
    grid_size: tuple[int, int] | None
    num_images: int

    def to_markdown(self) -> str:
        lines = ["| decoder layer | input/output cosine similarity |", "|---|---|"]
        lines += [f"| {i} | {s:.4f} |" for i, s in enumerate(self.layer_similarity)]
        tokens = torch.tensor(self.visual_token_redundancy)
        if len(tokens):
            lines += [
                "",
                f"Visual tokens ({self.num_images} images, {len(tokens)} tokens each): neighbour similarity mean "
                f"{tokens.mean():.3f}, median {tokens.median():.3f}; {100 * (tokens > 0.9).float().mean():.0f} % of the "
                "token positions are above 0.9.",
            ]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | Path, plot: bool = True) -> list[Path]:
        """Write `redundancy.json`, `redundancy.md` and (with matplotlib) `redundancy.png`; return the paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = [output_dir / "redundancy.json", output_dir / "redundancy.md"]
        paths[0].write_text(json.dumps(asdict(self), indent=2))
        paths[1].write_text(self.to_markdown())
        if plot:
            paths.append(self._plot(output_dir / "redundancy.png"))
        return paths

    def _plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].bar(range(len(self.layer_similarity)), self.layer_similarity, color="tab:blue")
        axes[0].set(xlabel="decoder layer", ylabel="cos(input, output)", title="Layer redundancy", ylim=(0, 1))
        if self.grid_size and len(self.visual_token_redundancy) == self.grid_size[0] * self.grid_size[1]:
            grid = torch.tensor(self.visual_token_redundancy).view(*self.grid_size)
            image = axes[1].imshow(grid, vmin=0, vmax=1, cmap="viridis")
            fig.colorbar(image, ax=axes[1], label="max neighbour cosine similarity")
            axes[1].set(title="Visual token redundancy (mean over images)")
        else:
            axes[1].hist(self.visual_token_redundancy, bins=20, range=(0, 1))
            axes[1].set(xlabel="max neighbour cosine similarity", title="Visual token redundancy")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@torch.no_grad()
def analyze_redundancy(model, batches, max_batches: int | None = None) -> RedundancyReport:
    """Run `model` (full depth, all tokens) over `batches` and measure layer and visual-token redundancy.

    Args:
        model (`PreTrainedModel`): a vision-language model; the visual-token half of the report needs a registered
            architecture adapter (e.g. `LlavaForConditionalGeneration`), the layer half works for any model.
        batches (`Iterable[dict]`): model inputs, e.g. from `VisionLanguageCollator`.
        max_batches (`int`, *optional*): stop after this many batches.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.data.collator import VisionLanguageCollator
    >>> from hf_sparse_mllm.skipping.analysis import analyze_redundancy
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> model, processor = build_tiny_llava_and_processor("test", words=["red"])
    >>> sample = {"images": [Image.new("RGB", (32, 32), "red")], "messages": [
    ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red ?"}]},
    ...     {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    >>> report = analyze_redundancy(model, [VisionLanguageCollator(processor)([sample])])
    >>> len(report.layer_similarity), len(report.visual_token_redundancy)
    (2, 16)

    ```
    """
    layers_meter = RedundancyMeter(len(model_parts.decoder_layers(model)))
    adapter = get_adapter(model) if has_adapter(model) else None
    token_sums: dict = {}  # grid -> (summed scores per position, number of units)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with layers_meter.watch(model_parts.decoder(model), model_parts.decoder_layers(model)):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch.pop("labels", None)
                with _token_redundancy(adapter, batch, token_sums):
                    model(**batch, use_cache=False)
    finally:
        model.train(was_training)
    # Per-position means need one grid: report the most common one.
    grid, (sums, units) = max(token_sums.items(), key=lambda item: item[1][1], default=(None, (None, 0)))
    return RedundancyReport(
        layer_similarity=[round(v, 6) for v in layers_meter.means()],
        visual_token_redundancy=[] if sums is None else [round(v, 6) for v in (sums / units).tolist()],
        grid_size=grid,
        num_images=units,
    )


@contextlib.contextmanager
def _token_redundancy(adapter, batch: dict, token_sums: dict):
    """Accumulate each grid unit's neighbour redundancy of the projected features during one forward."""
    if adapter is None or batch.get("input_ids") is None:
        yield
        return
    layout = adapter.layout(batch)
    module = adapter.feature_module()
    original = module.get_image_features

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        output = original(*args, **kwargs)
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in _entries(output.pooler_output)]).float()
        start = 0
        starts = []
        for run in layout.runs:
            starts.append(start)
            start += run.length
        for unit in layout.units:
            if unit.grid is None or not unit.compress:
                continue
            features = flat[starts[unit.run] + unit.offsets.to(flat.device)].unsqueeze(0)
            scores = neighbour_redundancy(features, unit.grid)[0].cpu()
            total, count = token_sums.get(unit.grid, (0, 0))
            token_sums[unit.grid] = (total + scores, count + 1)
        return output

    module.get_image_features = get_image_features
    try:
        yield
    finally:
        del module.get_image_features


def _entries(features):
    return [features] if isinstance(features, torch.Tensor) else list(features)

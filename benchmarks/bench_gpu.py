"""GPU step benchmark at real widths: the stock `Trainer` step against fast (DivPrune keeping 10 %), slow and the
DualSpeed mix, on models built from configs (random weights: a step's time does not depend on them).

    python -m benchmarks.bench_gpu                      # on one CUDA GPU: writes benchmarks/results/gpu.{json,md}
    PYTHONPATH=. python3 -m benchmarks.bench_gpu        # from a checkout, with only torch + transformers installed
    python -m benchmarks.bench_gpu --smoke              # tiny widths, 2 layers, CPU: checks the script in seconds

Shapes (bf16, SDPA attention, vision tower frozen, projector + decoder + isolator trained with AdamW):

- `llava15-7b`: CLIP-L/336 (576 visual tokens), a 4096-wide Llama decoder (LLaVA-1.5-7B widths).
- `llava-next-7b`: the same tower with anyres at 672 x 672 (a base tile and a 2 x 2 grid: 2,928 visual tokens).
- `qwen2.5-vl-7b`: the Qwen2.5-VL-7B vision tower (1280 wide, 32 blocks, windowed) on a 1,008 x 1,008 image (1,296
  merged tokens) and a 3584-wide Qwen2 decoder.

Each shape has `layers` decoder layers of the model's `full_layers` (32 or 28), chosen so that the whole run fits in
under 6 minutes on one H200 (about 790 bf16 TFLOP/s, say 450 reached): at batch 8 x 640 tokens a 7B-wide layer costs
about 6.4 TFLOP per step (forward + backward), ~15 ms, so 8 layers make a ~0.15 s stock LLaVA-1.5 step; LLaVA-NeXT
(4 x 2,992 tokens, ~16 TFLOP a layer) ~0.35 s; Qwen2.5-VL ~0.27 s, a quarter of it the 670M-parameter tower on 4 x
5,184 patches. Seven rounds of six variants, the builds and the batch searches (each capped by its share of
`--budget-seconds`) add up to an estimated 2-3 minutes. Every variant is also timed with the middle half of its
layers bypassed (the package's `fixed` layer skipping, which runs nothing for a skipped layer): the difference is the
cost of those layers, so the full-depth step is extrapolated as `t(layers) + (full_layers - layers) * per_layer`,
and its peak memory likewise, adding each layer's weights and AdamW state. The largest batch is searched by
doubling, at `layers` depth (a full-depth model fits fewer).

Timings: all variants step the same model on the same fixed batch, round-robin, medians reported; a step is
`training_step` (forward + backward) plus the optimizer step. Peak memory is `torch.cuda.max_memory_allocated()`
over the step. The mix is the expected step of the schedule with `--slow-mode-prob` slow steps:
`(1 - p) * fast + p * slow`. Results are written after every shape, so a run cut short keeps what it measured.

Only torch, transformers and hf_sparse_mllm are imported (not trl, datasets or the benchmark harness).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import hf_sparse_mllm
from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.trainer import StepPlan

H200_SECONDS = 360  # the budget the defaults are sized for


@dataclass(frozen=True)
class Shape:
    """A model family at given widths and the batch it is timed on."""

    family: str
    layers: int
    full_layers: int
    batch_size: int
    text_tokens: int = 64  # per sample, of which `answer_tokens` are trained
    answer_tokens: int = 16
    smoke: bool = False


SHAPES = {
    "llava15-7b": Shape("llava", layers=8, full_layers=32, batch_size=8),
    "llava-next-7b": Shape("llava_next", layers=8, full_layers=32, batch_size=4),
    "qwen2.5-vl-7b": Shape("qwen2_5_vl", layers=8, full_layers=28, batch_size=4),
}


# ---- models from configs -----------------------------------------------------------------------------------------


def _clip(smoke: bool):
    from transformers import CLIPVisionConfig

    if smoke:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, projection_dim=32)  # fmt: skip
    # CLIP ViT-L/14 at 336 px, as in LLaVA-1.5.
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip


def _llama(layers: int, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    # Vicuna-7B (LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B), with LLaVA's 32,064-token vocabulary.
    return LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False)  # fmt: skip


def build_config(shape: Shape):
    """The `transformers` config of `shape`, and `(image_token_id, extra special ids)` for building batches."""
    from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

    layers, smoke = shape.layers, shape.smoke
    if shape.family == "llava":
        return LlavaConfig(vision_config=_clip(smoke), text_config=_llama(layers, smoke),
                           image_token_id=32000 if not smoke else 1000, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=576 if not smoke else 16)  # fmt: skip
    if shape.family == "llava_next":
        tile = _clip(smoke).image_size
        pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
        return LlavaNextConfig(vision_config=_clip(smoke), text_config=_llama(layers, smoke),
                               image_token_id=32000 if not smoke else 1000, image_grid_pinpoints=pinpoints,
                               vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    if shape.family == "qwen2_5_vl":
        if smoke:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          window_size=56, fullatt_block_indexes=[1])  # fmt: skip
            text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)  # fmt: skip
            special = dict(
                image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003
            )
            mrope = [2, 3, 3]
        else:
            # Qwen2.5-VL-7B-Instruct's widths.
            vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
            text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, head_dim=128, max_position_embeddings=32768)  # fmt: skip
            special = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653)  # fmt: skip
            mrope = [16, 24, 24]
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="silu")
        rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope}
        text.update(num_hidden_layers=layers, rope_parameters=rope, tie_word_embeddings=False)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **special)
    raise ValueError(f"family must be one of llava, llava_next, qwen2_5_vl; got {shape.family!r}")


def build_model(shape: Shape, device: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    config = build_config(shape)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if shape.family == "qwen2_5_vl":
        model.model.visual.requires_grad_(False)
        model.model.visual.merger.requires_grad_(True)  # Qwen's projector is the tower's last module
    else:
        model.model.vision_tower.requires_grad_(False)
    return model.train()


# ---- a batch without a tokenizer -----------------------------------------------------------------------------------


def image_inputs(shape: Shape, model, batch_size: int) -> dict:
    """Random pixels in the family's layout: one image per sample."""
    vision = model.config.vision_config
    if shape.family == "llava":
        return {"pixel_values": torch.randn(batch_size, 3, vision.image_size, vision.image_size)}
    if shape.family == "llava_next":
        tile = vision.image_size  # a 2 x 2 grid of tiles plus the base tile: 5 tiles
        return {
            "pixel_values": torch.randn(batch_size, 5, 3, tile, tile),
            "image_sizes": torch.tensor([[2 * tile, 2 * tile]] * batch_size),
        }
    side = 4 if shape.smoke else 72  # patches per side: 1,008 px at 14 px patches
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    return {
        "pixel_values": torch.randn(batch_size * side * side, patch),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch_size),
    }


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def visual_tokens_per_image(shape: Shape, model, device: str, dtype: torch.dtype) -> int:
    """What the model turns one image into, measured (anyres newline tokens and merging included)."""
    with torch.no_grad():
        features = model.model.get_image_features(**to_device(image_inputs(shape, model, 1), device, dtype))
    return sum(len(f) for f in features.pooler_output)


def make_batch(shape: Shape, model, batch_size: int, n_visual: int, device: str, dtype: torch.dtype) -> dict:
    """Samples of one length (no padding): `<bos> prompt <image span> question answer`, labels on the answer; the
    text is random token ids (no tokenizer is needed)."""
    config = model.config
    generator = torch.Generator().manual_seed(batch_size)
    vocab = min(config.text_config.vocab_size, config.image_token_id) - 8
    prompt = shape.text_tokens - shape.answer_tokens - 1
    text = torch.randint(8, vocab, (batch_size, shape.text_tokens), generator=generator)
    image = torch.full((batch_size, n_visual), config.image_token_id)
    if shape.family == "qwen2_5_vl":
        start = torch.full((batch_size, 1), config.vision_start_token_id)
        end = torch.full((batch_size, 1), config.vision_end_token_id)
        image = torch.cat([start, image, end], dim=1)
    input_ids = torch.cat([text[:, : 1 + prompt // 2], image, text[:, 1 + prompt // 2 :]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -shape.answer_tokens :] = input_ids[:, -shape.answer_tokens :]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if shape.family == "qwen2_5_vl":
        batch["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
    return to_device({**batch, **image_inputs(shape, model, batch_size)}, device, dtype)


# ---- the variants --------------------------------------------------------------------------------------------------


class ForcedPlanTrainer(SparseMLLMTrainer):
    """Every step in one `mode` with the given layers bypassed (through the trainer's public `plan_step` hook)."""

    def __init__(self, *args, mode: str, skipped: tuple[int, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.forced = (mode, skipped)

    def plan_step(self, step: int, micro: int = 0) -> StepPlan:
        mode, skipped = self.forced
        return StepPlan(step, micro, mode, skipped)


def middle_half(num_layers: int) -> tuple[int, ...]:
    count = num_layers // 2
    start = (num_layers - count) // 2
    return tuple(range(start, start + count))


# tag -> (mode, token compressor, middle half of the layers bypassed); `stock` is the plain `Trainer`. `stock/2` is
# the stock forward (no compressor) of SparseMLLMTrainer with half the layers bypassed.
SPARSE_VARIANTS = {
    "stock/2": ("fast", None, True),
    "fast": ("fast", "divprune", False),
    "fast/2": ("fast", "divprune", True),
    "slow": ("slow", "divprune", False),
    "slow/2": ("slow", "divprune", True),
}


def make_trainers(model, opts: dict) -> dict:
    """Every variant's trainer over the same model, sharing one optimizer (one AdamW state, as one run has)."""
    from transformers import Trainer, TrainingArguments

    on_gpu = opts["device"].startswith("cuda")
    args = TrainingArguments("outputs/bench-gpu", report_to="none", use_cpu=not on_gpu, bf16=on_gpu)
    half = middle_half(model.config.text_config.num_hidden_layers)
    trainers = {"stock": Trainer(model=model, args=args)}
    for tag, (mode, compressor, bypass) in SPARSE_VARIANTS.items():
        skipped = half if bypass else ()
        config = SparseMLLMConfig(
            token_compressor=compressor,
            keep_ratio=opts["keep_ratio"],
            stage="instruction",
            # The fixed policy makes the trainer bypass layers; `plan_step` says which.
            layer_skip_policy="fixed" if skipped else None,
            skip_layers=list(skipped) or None,
            protect_layers=0,
            skip_on_slow_steps=bool(skipped),
        )
        trainers[tag] = ForcedPlanTrainer(model=model, args=args, sparse_config=config, mode=mode, skipped=skipped)
    # Built after the trainers, so that it holds the mode isolator they attached.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for trainer in trainers.values():
        trainer.optimizer = optimizer
        # Set by `Trainer`'s training loop, which is not run here: one micro-batch per optimizer step.
        trainer.current_gradient_accumulation_steps = 1
    return trainers


def one_step(trainer, batch: dict) -> None:
    n_items = (batch["labels"][:, 1:] != -100).sum()
    trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(trainer, batch: dict, device: str) -> tuple[float, float | None]:
    """Seconds and peak GiB (CUDA) of one step."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    one_step(trainer, batch)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None)


def largest_batch(trainer, shape, model, n_visual: int, opts, start: int, deadline: float) -> dict:
    """Double the batch until a step runs out of memory, `--max-batch` or the deadline; the last batch that fit."""
    fit, tried, reason = None, start, "max batch"
    while tried <= opts["max_batch"]:
        if time.perf_counter() > deadline:
            reason = "time budget"
            break
        batch = out_of_memory = None
        try:
            batch = make_batch(shape, model, tried, n_visual, opts["device"], opts["dtype"])
            seconds, peak = timed_step(trainer, batch, opts["device"])
            fit = {"batch_size": tried, "step_seconds": seconds, "peak_gib": peak}
        except torch.OutOfMemoryError:
            out_of_memory = True
        batch = None
        if out_of_memory:
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            reason = "out of memory"
            break
        print(f"[bench-gpu]   batch {tried} fits", flush=True)
        tried *= 2
    return {"largest": fit, "stopped_by": reason, "next_tried": tried}


# ---- one shape -------------------------------------------------------------------------------------------------------


def run_shape(name: str, shape: Shape, opts: dict, deadline: float) -> dict:
    device, dtype = opts["device"], opts["dtype"]
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(shape, device, dtype)
    n_visual = visual_tokens_per_image(shape, model, device, dtype)
    batch = make_batch(shape, model, shape.batch_size, n_visual, device, dtype)
    trainers = make_trainers(model, opts)
    seq_len = batch["input_ids"].shape[1]
    print(f"[bench-gpu] {name}: built in {time.perf_counter() - start:.0f} s; {n_visual} visual tokens per image, "
          f"{seq_len} per sequence", flush=True)  # fmt: skip
    times = {tag: [] for tag in trainers}
    peaks = {tag: 0.0 for tag in trainers}
    for round_ in range(opts["warmup"] + opts["steps"]):
        for tag, trainer in trainers.items():
            seconds, peak = timed_step(trainer, batch, device)
            if round_ >= opts["warmup"]:
                times[tag].append(seconds)
                peaks[tag] = max(peaks[tag], peak or 0.0)
        print(f"[bench-gpu] {name}: round {round_ + 1}/{opts['warmup'] + opts['steps']}", flush=True)
    report = summarise(shape, model, times, peaks, opts, device)
    report.update(visual_tokens_per_image=n_visual, sequence_length=seq_len)
    for tag in ("stock", "fast"):
        print(f"[bench-gpu] {name}: largest batch, {tag}", flush=True)
        report["largest_batch"][tag] = largest_batch(
            trainers[tag], shape, model, n_visual, opts, shape.batch_size, deadline
        )
    report["seconds"] = time.perf_counter() - start
    del trainers, model, batch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


def _mix(fast: float | None, slow: float | None, p: float) -> float | None:
    return None if fast is None or slow is None else (1 - p) * fast + p * slow


def summarise(shape: Shape, model, times, peaks, opts, device: str) -> dict:
    p, on_gpu = opts["slow_mode_prob"], device.startswith("cuda")
    median = {tag: statistics.median(t) for tag, t in times.items()}
    layers, skipped = shape.layers, len(middle_half(shape.layers))
    decoder = model.model.language_model
    per_layer_params = sum(p.numel() for p in decoder.layers[0].parameters())
    # Weights + AdamW's two moments in the parameter dtype; a skipped layer's gradient is in the measured difference.
    per_layer_state_gib = 3 * per_layer_params * torch.finfo(opts["dtype"]).bits / 8 / 2**30
    variants = {}
    for tag in ("stock", "fast", "slow"):
        per_layer = (median[tag] - median[f"{tag}/2"]) / skipped
        per_layer_peak = (peaks[tag] - peaks[f"{tag}/2"]) / skipped + per_layer_state_gib
        # Bypassing layers that saves no time is noise (a tiny model on a busy CPU): no extrapolation then.
        extrapolate = per_layer > 0
        variants[tag] = {
            "median_step_seconds": median[tag],
            "step_seconds": times[tag],
            "half_depth_median_step_seconds": median[f"{tag}/2"],
            "per_layer_seconds": per_layer,
            "full_depth_step_seconds": median[tag] + (shape.full_layers - layers) * per_layer if extrapolate else None,
            "peak_gib": peaks[tag] if on_gpu else None,
            "full_depth_peak_gib": peaks[tag] + (shape.full_layers - layers) * per_layer_peak if on_gpu else None,
        }
    fast, slow = variants["fast"], variants["slow"]
    mix = {key: _mix(fast[key], slow[key], p) for key in ("median_step_seconds", "full_depth_step_seconds")}
    # A mix's peak is its larger step's.
    mix.update({key: max(fast[key], slow[key]) if on_gpu else None for key in ("peak_gib", "full_depth_peak_gib")})
    variants["mix"] = mix
    stock = variants["stock"]
    for entry in variants.values():
        entry["samples_per_second"] = shape.batch_size / entry["median_step_seconds"]
        entry["speedup"] = stock["median_step_seconds"] / entry["median_step_seconds"]
        full, full_stock = entry["full_depth_step_seconds"], stock["full_depth_step_seconds"]
        entry["full_depth_speedup"] = full_stock / full if full and full_stock else None
    return {
        "shape": asdict(shape),
        "decoder_layer_parameters": per_layer_params,
        "variants": variants,
        "largest_batch": {},
    }


# ---- report --------------------------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def markdown(report: dict) -> str:
    opts = report["options"]
    lines = [
        f"Step time on {report['machine']['device_name']} ({opts['dtype']}, SDPA, vision tower frozen, AdamW), "
        f"DivPrune keeping {opts['keep_ratio']} of the visual tokens (+ 4 isolator tokens) on fast steps; the mix "
        f"is the expected step with {100 * opts['slow_mode_prob']:.0f} % slow steps. Measured at the `layers` "
        "shown; `full depth` extrapolates from the measured cost of bypassing half of them (see "
        "`benchmarks/bench_gpu.py`). torch "
        f"{report['machine']['torch']}, transformers {report['machine']['transformers']}.",
        "",
        "| shape | layers (of) | batch x tokens | step | median s | samples/s | speed-up | peak GiB | "
        "full depth s | full depth speed-up | full depth peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape_report in report["shapes"].items():
        shape = shape_report["shape"]
        for tag, v in shape_report["variants"].items():
            lines.append(
                f"| {name} | {shape['layers']} ({shape['full_layers']}) | {shape['batch_size']} x "
                f"{shape_report['sequence_length']} | {tag} | {v['median_step_seconds']:.3f} | "
                f"{v['samples_per_second']:.1f} | {v['speedup']:.2f}x | {_cell(v['peak_gib'], '.1f')} | "
                f"{_cell(v['full_depth_step_seconds'], '.3f')} | {_cell(v['full_depth_speedup'], '.2f', 'x')} | "
                f"{_cell(v['full_depth_peak_gib'], '.1f')} |"
            )
    lines += ["", "Largest batch that fits (doubling from the timed batch, at the `layers` shown):", ""]
    lines += ["| shape | stock | fast |", "|---|---|---|"]
    for name, shape_report in report["shapes"].items():
        cells = []
        for tag in ("stock", "fast"):
            found = shape_report["largest_batch"].get(tag)
            if not found or not found["largest"]:
                cells.append("none measured" if not found else f"none ({found['stopped_by']})")
                continue
            largest = found["largest"]
            more = f"; {found['next_tried']}: {found['stopped_by']}"
            cells.append(f"{largest['batch_size']} ({largest['step_seconds']:.2f} s{more})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    if report.get("incomplete"):
        lines += ["", f"Incomplete: {report['incomplete']}."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu.md").write_text(markdown(report))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of every shape (default: per shape)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--slow-mode-prob", type=float, default=0.1, help="share of slow steps in the mix")
    parser.add_argument("--max-batch", type=int, default=1024, help="where the largest-batch search stops")
    parser.add_argument("--budget-seconds", type=float, default=H200_SECONDS - 30,
                        help="stop the largest-batch searches after this much wall time")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, CPU, batch 2, one step each")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", default="benchmarks/results", help="where gpu.{json,md} go")
    opts = vars(parser.parse_args(argv))
    started = time.perf_counter()
    if opts["smoke"]:
        opts.update(steps=1, warmup=0, max_batch=2)
    opts["device"] = opts["device"] or ("cuda" if torch.cuda.is_available() and not opts["smoke"] else "cpu")
    opts["dtype"] = torch.bfloat16 if opts["device"].startswith("cuda") else torch.float32
    unknown = set(opts["shapes"].split(",")) - set(SHAPES)
    if unknown:
        raise ValueError(f"--shapes must name shapes among {sorted(SHAPES)}, got unknown {sorted(unknown)}")
    out = Path(opts.pop("output"))
    device_name = torch.cuda.get_device_name() if opts["device"].startswith("cuda") else platform.processor() or "cpu"
    report = {
        "machine": {
            "device_name": device_name,
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_sparse_mllm": hf_sparse_mllm.__version__,
        },
        "options": {**opts, "dtype": str(opts["dtype"]).removeprefix("torch.")},
        "shapes": {},
    }
    names = opts["shapes"].split(",")
    for index, name in enumerate(names):
        # Each shape's largest-batch search ends with its share of the budget.
        deadline = started + opts["budget_seconds"] * (index + 1) / len(names)
        shape = SHAPES[name]
        overrides = {"layers": opts["layers"]} if opts["layers"] else {}
        if opts["smoke"]:
            overrides = {"layers": 2, "batch_size": 2, "text_tokens": 12, "answer_tokens": 4, "smoke": True}
        shape = Shape(**{**asdict(shape), **overrides})
        report["incomplete"] = f"stopped while measuring {name}"
        write(report, out)
        report["shapes"][name] = run_shape(name, shape, opts, deadline)
        write(report, out)
    report.pop("incomplete")
    report["total_seconds"] = time.perf_counter() - started
    write(report, out)
    print(markdown(report))
    print(f"[bench-gpu] wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {report['total_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()

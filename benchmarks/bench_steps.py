"""Step-time benchmark: stock `Trainer` vs sparse steps (token compression, DualSpeed, layer skipping), one run.

    python -m benchmarks.bench_steps                     # every shape, writes benchmarks/results/steps.{json,md}
    python -m benchmarks.bench_steps --shapes llavanext,qwen25vl --steps 3 --output outputs/bench-steps
    python -m benchmarks.bench_steps --shapes vit196 --steps 5 --batch-size 2 --output outputs/bench-steps

Shapes (tiny widths, the geometry of the real models; see `SHAPES`): `llava15` (LLaVA-1.5, 336 px / 14 px = 576
visual tokens), `vit196` (224 px / 16 px = 196), `llavanext` (LLaVA-NeXT: a 672 x 672 image = a 336 px base tile plus
a 2 x 2 anyres grid, 2,928 visual tokens with the newline column) and `qwen25vl` (Qwen2.5-VL: 896 x 896 px, 14 px
patches merged 2 x 2 = 1,024 visual tokens, M-RoPE). Every shape has the same 8 x 256 decoder, so that, as at 7B
scale, the language model dominates the step, and a small frozen vision tower (the projector trains); the Qwen2.5-VL
tower has the real model's heads of 80 and 112 px windows (`Shape.vision_config`).

Timings: every variant steps the same model on the same fixed batch, round-robin (stock, fast, slow, ... then again),
so machine load hits all variants alike; medians of the wall clock and of this process's CPU time are reported. A step
is `training_step` (forward + backward) plus the optimizer step. Memory: megabytes of activations saved for backward in
one step (all devices) and, on CUDA, the step's peak allocation. The DualSpeed mix is the expected step of the schedule
(the schedule does not depend on the data): `(1 - p) * fast + p * slow`. The FLOP-ideal speed-up counts matmul FLOPs of
the same sequence lengths: the tower's forward (counted by `torch.utils.flop_counter` with eager attention, once per
step and twice on slow steps, whose teacher runs it again), the projector's forward and backward, and the language
model's forward and backward over the sequence the step runs (on fast steps the kept tokens plus the isolator: the
length `compress_batch` gives; attention over the causal half of the scores), its LM head at the positions computed.
The compression's own cost is the sparse forward's work outside the model, timed on the batch as the forward runs it:
the layout, shortening the sequence (`compress_batch`) and the unit-by-unit selection with the re-assembly of the
features; "selection" is the compressor's calls alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_sparse_mllm import SparseMLLMTrainer

WORDS = "describe the picture in detail please and tell me what you see there".split()
# name -> (mode, fraction of decoder layers skipped)
VARIANTS = {
    "stock": (None, 0.0),
    "fast": ("fast", 0.0),
    "slow": ("slow", 0.0),
    "skip25": ("plain", 0.25),
    "skip50": ("plain", 0.5),
    "fast+skip25": ("fast", 0.25),
    "fast+skip50": ("fast", 0.5),
}
DUALSPEED_VARIANTS = ("stock", "fast", "slow")
# The language model dominates the step, as at 7B scale (ARCHITECTURES.md, "Costs at LLaVA-NeXT scale"); the tower
# is small and frozen.
_WIDTHS = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=4,
    vision_hidden_size=64,
    vision_layers=2,
)
# LLaVA-NeXT's own candidate resolutions for 336 px tiles; a 672 x 672 image gets the 2 x 2 grid.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a tiny model of `family` built with `builder` arguments, and its batch and rounds.

    Args:
        family (`str`): the tiny family (`hf_sparse_mllm.tiny.build_tiny_model_and_processor`).
        builder (`dict`): the builder's arguments.
        image_size (`tuple[int, int]`): (width, height) of every image.
        tower (`str`): the vision tower, frozen (dotted path under the model).
        projector (`str`): the projector, trained (under the model; it may sit inside the tower, as Qwen's merger).
        batch_size (`int`): samples per step.
        steps (`int`): timed rounds (medians reported).
        warmup (`int`): untimed rounds first.
        variants (`tuple[str, ...]`): keys of `VARIANTS` timed at this shape.
        vision_config (`dict`): vision config fields set over the builder's, before the weights are drawn (the real
            model's geometry where the builder's tiny default differs).
    """

    family: str
    builder: dict
    image_size: tuple[int, int]
    tower: str
    projector: str
    batch_size: int = 4
    steps: int = 8
    warmup: int = 2
    variants: tuple[str, ...] = tuple(VARIANTS)
    vision_config: dict = dataclasses.field(default_factory=dict)


_LLAVA = dict(tower="model.vision_tower", projector="model.multi_modal_projector")
SHAPES = {
    "llava15": Shape(
        "llava", dict(preset="llava15", vision_feature_layer=-2, **_WIDTHS), (336, 336), **_LLAVA, batch_size=4
    ),
    "vit196": Shape(
        "llava", dict(preset="vit196", vision_feature_layer=-2, **_WIDTHS), (224, 224), **_LLAVA, batch_size=4
    ),
    # The stock step takes about 8 s on this CPU: few rounds.
    "llavanext": Shape(
        "llava_next",
        dict(image_size=336, patch_size=14, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **_WIDTHS),
        (672, 672),
        **_LLAVA,
        batch_size=2,
        steps=3,
        warmup=1,
        variants=DUALSPEED_VARIANTS,
    ),
    "qwen25vl": Shape(
        "qwen2_5_vl",
        dict(patch_size=14, min_pixels=896 * 896, max_pixels=896 * 896, **_WIDTHS),
        (896, 896),
        tower="model.visual",
        projector="model.visual.merger",
        batch_size=2,
        steps=8,
        warmup=1,
        variants=DUALSPEED_VARIANTS,
        # Qwen2.5-VL-7B's tower attends with heads of 80 (1,280 / 16) in windows of 112 px (8 x 8 patches); the
        # builder's tiny tower has heads of 16 (64 / 4) in 56 px windows, made for small test images.
        vision_config=dict(hidden_size=80, intermediate_size=160, num_heads=1, window_size=112),
    ),
}


def build(shape: Shape, batch_size: int, text_tokens: int, device: str):
    """The shape's model (tower frozen, projector trained) and one collated batch of noise images."""
    from PIL import Image

    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.tiny import build_tiny_model_and_processor

    model, processor = build_tiny_model_and_processor(shape.family, words=WORDS, **shape.builder)
    if shape.vision_config:
        config = model.config
        for name, value in shape.vision_config.items():
            if not hasattr(config.vision_config, name):  # a misspelled field would be silently ignored
                raise ValueError(f"{type(config.vision_config).__name__} has no field {name!r}")
            setattr(config.vision_config, name, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = type(model)(config).float()
    model.get_submodule(shape.tower).requires_grad_(False)
    model.get_submodule(shape.projector).requires_grad_(True)
    question = " ".join((WORDS * 20)[: max(text_tokens - 12, 1)])
    samples = [
        {
            "images": [Image.effect_noise(shape.image_size, 40 + i).convert("RGB")],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": "what you see there"}]},
            ],
        }
        for i in range(batch_size)
    ]
    batch = VisionLanguageCollator(processor)(samples)
    return model.to(device), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def visual_inputs(batch: dict) -> dict:
    """The arguments of `get_image_features` in a batch (the families' own keys)."""
    return {k: batch[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in batch}


def skip_set(num_layers: int, fraction: float) -> list[int]:
    """The middle `fraction` of the decoder layers (the first and last are protected)."""
    count = int(round(fraction * num_layers))
    start = (num_layers - count) // 2
    return list(range(start, start + count))


class ForcedModeTrainer(SparseMLLMTrainer):
    """A `SparseMLLMTrainer` whose every step is a `forced_mode` step: `"fast"`, `"slow"`, or `"plain"` (a fast step
    whose recipe has no compressor, so only layer skipping changes it)."""

    def __init__(self, *args, forced_mode: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.forced_mode = forced_mode

    # The benchmark times each kind of step on its own, while the trainer takes each step's mode from its schedule:
    # the public `plan_step` hook makes every step take the forced mode, with that mode's skipped layers.
    def plan_step(self, step: int, micro: int = 0):
        mode = "fast" if self.forced_mode == "plain" else self.forced_mode
        plan = super().plan_step(step, micro)
        return dataclasses.replace(plan, mode=mode, skipped_layers=self.skipped_layers(step, mode))


def make_trainers(model, opts, variants):
    from transformers import Trainer, TrainingArguments

    from hf_sparse_mllm import SparseMLLMConfig

    device = opts["device"]
    args = TrainingArguments(
        "outputs/bench/tmp", report_to="none", use_cpu=device == "cpu", learning_rate=1e-7, bf16=opts["bf16"]
    )
    layers = model.config.get_text_config().num_hidden_layers
    trainers = {}
    for name in variants:
        mode, fraction = VARIANTS[name]
        if mode is None:
            trainer = Trainer(model=model, args=args)
        else:
            skip = skip_set(layers, fraction)
            config = SparseMLLMConfig(
                token_compressor=None if mode == "plain" else opts["compressor"],
                keep_ratio=opts["keep_ratio"],
                slow_mode_prob=opts["slow_mode_prob"],
                stage="instruction",
                layer_skip_policy="fixed" if skip else None,
                skip_layers=skip or None,
                protect_layers=0,
            )
            trainer = ForcedModeTrainer(model=model, args=args, sparse_config=config, forced_mode=mode)
        trainer.create_optimizer()
        # Set by the training loop, which the benchmark does not run (the stock step of a model whose loss takes no
        # `num_items_in_batch`, e.g. Qwen2.5-VL, divides by it).
        trainer.current_gradient_accumulation_steps = 1
        trainers[name] = trainer
    return trainers


def one_step(trainer, model, batch, n_items):
    trainer.training_step(model, dict(batch), num_items_in_batch=n_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(name: str, opts):
    from hf_sparse_mllm.adapters import get_adapter
    from hf_sparse_mllm.compressors import get_compressor
    from hf_sparse_mllm.sparse_forward import Compression, compress_batch

    shape = SHAPES[name]
    batch_size = opts["batch_size"] or shape.batch_size
    steps = opts["steps"] or shape.steps
    warmup = shape.warmup if opts["warmup"] is None else opts["warmup"]
    torch.manual_seed(0)
    device = opts["device"]
    model, batch = build(shape, batch_size, opts["text_tokens"], device)
    trainers = make_trainers(model, opts, shape.variants)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    times = {variant: [] for variant in trainers}
    cpu_times = {variant: [] for variant in trainers}
    for round_ in range(warmup + steps):
        for variant, trainer in trainers.items():
            start = _now(device)
            one_step(trainer, model, batch, n_items)
            wall, cpu = _since(start, device)
            if round_ >= warmup:
                times[variant].append(wall)
                cpu_times[variant].append(cpu)
        print(f"[bench] {name}: round {round_ + 1}/{warmup + steps}", flush=True)

    isolator = trainers["fast"].isolator
    compression = Compression(get_compressor(opts["compressor"]), opts["keep_ratio"], isolator=isolator)
    adapter = get_adapter(model)
    short = compress_batch(adapter, batch, compression)
    lengths = {"full": batch["input_ids"].shape[1], "short": short.inputs["input_ids"].shape[1]}
    vision, projector = vision_flops(model, batch, model.get_submodule(shape.projector))
    flops = {variant: ideal_flops(model, batch, variant, lengths, vision + 2 * projector) for variant in trainers}
    memory = {
        variant: activation_megabytes(trainer, model, batch, n_items, device) for variant, trainer in trainers.items()
    }
    layout = short.layout
    return {
        "batch_size": batch_size,
        "steps": steps,
        "memory": memory,
        "times": times,
        "cpu_times": cpu_times,
        "flops": flops,
        "seq_len": lengths["full"],
        "fast_seq_len": lengths["short"],
        "visual_tokens_per_image": sum(run.length for run in layout.runs) / layout.num_images,
        "visual_tokens_kept_per_image": short.visual_tokens_per_image,
        "visual_units_per_image": len(layout.units) / layout.num_images,
        "isolator_tokens": compression.num_isolator_tokens,
        "decoder_layers": model.config.get_text_config().num_hidden_layers,
        "tower_flops": vision,
        "projector_flops": projector,
        **tower_seconds(model, batch, max(steps, 5), device),
        **compression_seconds(adapter, model, batch, compression, max(steps, 5), device),
    }


# ---- timing, and the tower's and the compression's own cost -------------------------------------------------


def _now(device: str) -> tuple[float, float]:
    sync(device)
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds since `start` (`_now`): CPU time is less disturbed by other processes on a
    shared machine, and with one torch thread it is the step's compute."""
    wall, cpu = _now(device)
    return wall - start[0], cpu - start[1]


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def tower_seconds(model, batch, rounds: int, device: str) -> dict:
    """Median wall-clock and CPU seconds of one `get_image_features` call on the batch (tower and projector, no
    autograd)."""
    samples = []
    for _ in range(rounds):
        start = _now(device)
        with torch.no_grad():
            model.model.get_image_features(**visual_inputs(batch))
        samples.append(_since(start, device))
    wall, cpu = _medians(samples)
    return {"tower_seconds": wall, "tower_cpu_seconds": cpu}


def compression_seconds(adapter, model, batch, compression, rounds: int, device: str) -> dict:
    """Median wall-clock and CPU seconds of the sparse forward's own work on `batch` outside the model (the layout,
    `compress_batch`, and the forward hook's selection and re-assembly of the projected features, unit by unit), and
    of the compressor's calls within it (`selection_*`)."""
    from hf_sparse_mllm.sparse_forward import _compress_output, compress_batch

    with torch.no_grad():
        features = adapter.feature_module().get_image_features(**visual_inputs(batch), return_dict=True)
    compressor = compression.compressor
    calls: list[list[float]] = []
    method = compressor.compress_with_indices

    def timed(*args, **kwargs):
        start = _now(device)
        result = method(*args, **kwargs)
        wall, cpu = _since(start, device)
        calls[-1][0] += wall
        calls[-1][1] += cpu
        return result

    totals = []
    compressor.compress_with_indices = timed  # an instance attribute over the method, removed below
    try:
        for _ in range(rounds):
            calls.append([0.0, 0.0])
            start = _now(device)
            layout = adapter.layout(batch)
            short = compress_batch(adapter, batch, compression, layout)
            # The forward hook's own function, so the timing is the library's code, not a re-implementation.
            _compress_output(copy.copy(features), adapter, short, compression, {})
            if short.full_position_ids is not None:
                short.position_ids()  # M-RoPE: the kept tokens' positions, gathered before the language model
            totals.append(_since(start, device))
    finally:
        del compressor.compress_with_indices
    (wall, cpu), (selection_wall, selection_cpu) = _medians(totals), _medians(calls)
    return {
        "compression_seconds": wall,
        "compression_cpu_seconds": cpu,
        "selection_seconds": selection_wall,
        "selection_cpu_seconds": selection_cpu,
    }


# ---- FLOP model --------------------------------------------------------------------------------------------------


def lm_flops(model, rows, seq_len, logit_positions, layer_fraction=1.0, trained=True):
    """Matmul FLOPs of the language model over `rows` rows of `seq_len` tokens (x3 with backward).

    Attention counts the causal half of the score matrix (queries times the keys up to them, then the values): the
    fused kernels skip the rest (these batches have no padding, so SDPA runs with `is_causal=True`).
    """
    text = model.config.get_text_config()
    lm = model.model.language_model
    per_token = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embed" not in n)
    flops = layer_fraction * (
        2 * per_token * rows * seq_len + 2 * text.num_hidden_layers * rows * seq_len**2 * text.hidden_size
    )
    flops += 2 * text.hidden_size * text.vocab_size * logit_positions
    return flops * (3 if trained else 1)


def vision_flops(model, batch, projector) -> tuple[float, float]:
    """Forward FLOPs of the tower with its projector on the batch's images, and of the projector alone.

    Counted by `torch.utils.flop_counter.FlopCounterMode`, which sees attention only as eager matmuls (not SDPA's
    fused kernels): the count runs with eager attention, then the model gets its own implementation back.
    """
    from torch.utils.flop_counter import FlopCounterMode

    inputs = []
    handle = projector.register_forward_hook(lambda module, args, output: inputs.append(args))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.get_image_features(**visual_inputs(batch))
    finally:
        model.set_attn_implementation(implementation)
        handle.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as projector_counter:
        for args in inputs:
            projector(*args)
    return counter.get_total_flops(), projector_counter.get_total_flops()


def ideal_flops(model, batch, variant, lengths, vision):
    """FLOPs of one `variant` step: `vision` (tower forward, projector forward and backward) per visual pass, plus the
    language model over the full sequence or, on fast steps and slow steps' teacher, the shortened one."""
    rows = batch["input_ids"].shape[0]
    answers = int((batch["labels"][:, 1:] != -100).sum())
    mode, fraction = VARIANTS[variant]
    layers = model.config.get_text_config().num_hidden_layers
    kept = 1 - len(skip_set(layers, fraction)) / layers
    full, short = lengths["full"], lengths["short"]
    if mode is None:
        return vision + lm_flops(model, rows, full, rows * full)
    if mode == "plain":
        return vision + lm_flops(model, rows, full, answers, kept)
    if mode == "fast":
        return vision + lm_flops(model, rows, short, answers, kept)
    # slow: teacher = fast forward without grad, student = full tokens; both full depth
    return 2 * vision + lm_flops(model, rows, short, answers, trained=False) + lm_flops(model, rows, full, answers)


# ---- memory ------------------------------------------------------------------------------------------------------


def activation_megabytes(trainer, model, batch, n_items, device):
    """Bytes of tensors autograd saves for backward during one step (distinct storages): the activation memory a
    sparse step avoids, deterministic and comparable across machines. On CUDA also the step's peak allocation."""
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        one_step(trainer, model, batch, n_items)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return total[0] / 2**20, peak


# ---- report ------------------------------------------------------------------------------------------------------

MIXES = (("mix", "fast"), ("mix+skip25", "fast+skip25"), ("mix+skip50", "fast+skip50"))


def shape_report(res: dict, p: float) -> dict:
    """Medians, speed-ups against the stock step, FLOP-ideal speed-ups and memory of every variant of one shape."""
    medians = {name: statistics.median(t) for name, t in res["times"].items()}
    cpu = {name: statistics.median(t) for name, t in res["cpu_times"].items()}
    flops = dict(res["flops"])
    for tag, fast in MIXES:
        if fast in medians:
            for values in (medians, cpu, flops):
                values[tag] = (1 - p) * values[fast] + p * values["slow"]
    report = {
        key: res[key]
        for key in (
            "batch_size",
            "steps",
            "seq_len",
            "fast_seq_len",
            "visual_tokens_per_image",
            "visual_tokens_kept_per_image",
            "visual_units_per_image",
            "isolator_tokens",
            "decoder_layers",
            "tower_flops",
            "projector_flops",
            "tower_seconds",
            "tower_cpu_seconds",
            "compression_seconds",
            "compression_cpu_seconds",
            "selection_seconds",
            "selection_cpu_seconds",
        )
    }
    for part in ("compression", "selection"):
        report[f"{part}_share_of_fast_step"] = res[f"{part}_seconds"] / medians["fast"]
        report[f"{part}_share_of_fast_step_cpu_time"] = res[f"{part}_cpu_seconds"] / cpu["fast"]
    report["variants"] = {}
    for name, median in medians.items():
        if name.startswith("mix"):  # a mix's peak is its larger step's
            fast = name.replace("mix", "fast")
            activations, peak = (
                max(a, b) if a is not None else None for a, b in zip(res["memory"][fast], res["memory"]["slow"])
            )
        else:
            activations, peak = res["memory"][name]
        speedup, ideal = medians["stock"] / median, flops["stock"] / flops[name]
        cpu_speedup = cpu["stock"] / cpu[name]
        entry = {
            "median_step_seconds": median,
            "median_step_cpu_seconds": cpu[name],
            "samples_per_second": res["batch_size"] / median,
            "speedup": speedup,
            "speedup_cpu_time": cpu_speedup,
            "flop_ideal_speedup": ideal,
            "fraction_of_ideal": speedup / ideal,
            "fraction_of_ideal_cpu_time": cpu_speedup / ideal,
            "flops": flops[name],
            "saved_activations_mb": activations,
            "peak_memory_mb": peak,
        }
        if name in res["times"]:
            entry["step_times"] = res["times"][name]
            entry["step_cpu_times"] = res["cpu_times"][name]
        report["variants"][name] = entry
    return report


def format_markdown(report: dict) -> str:
    opts, p = report["options"], report["options"]["slow_mode_prob"]
    lines = [
        f"Median step time, ~{opts['text_tokens']} text tokens, keep_ratio {opts['keep_ratio']} "
        f"({opts['compressor']}, per visual unit, + 4 isolator tokens per image), vision tower frozen (projector "
        f"trained), 8 x 256 decoder, device {opts['device']}, {opts['threads']} threads. `skipNN`: NN % of the "
        f"decoder layers skipped (fixed policy). `mix`: expected step of the DualSpeed schedule with {100 * p:.0f} % "
        "slow steps.",
        "",
        "| shape | batch | step | median s | samples/s | speed-up | FLOP-ideal | % of ideal | median CPU s | speed-up "
        "(CPU time) | % of ideal (CPU time) | activations MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, sr in report["shapes"].items():
        for name, v in sr["variants"].items():
            peak = "n/a (CPU)" if v["peak_memory_mb"] is None else f"{v['peak_memory_mb']:.0f}"
            lines.append(
                f"| {shape} | {sr['batch_size']} | {name} | {v['median_step_seconds']:.3f} | "
                f"{v['samples_per_second']:.1f} | {v['speedup']:.2f}x | {v['flop_ideal_speedup']:.2f}x | "
                f"{100 * v['fraction_of_ideal']:.0f}% | {v['median_step_cpu_seconds']:.3f} | "
                f"{v['speedup_cpu_time']:.2f}x | {100 * v['fraction_of_ideal_cpu_time']:.0f}% | "
                f"{v['saved_activations_mb']:.0f} | {peak} |"
            )
    lines += [
        "",
        "| shape | tokens per sequence (full / fast) | visual tokens per image (full / kept) | visual units per image "
        "| tower + projector: GFLOP, ms (CPU ms) | compression ms (CPU ms): % of fast step (CPU time) | selection ms "
        "(CPU ms): % of fast step (CPU time) | timed rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, sr in report["shapes"].items():
        parts = [
            f"{1000 * sr[f'{part}_seconds']:.1f} ({1000 * sr[f'{part}_cpu_seconds']:.1f}): "
            f"{100 * sr[f'{part}_share_of_fast_step']:.1f} % ({100 * sr[f'{part}_share_of_fast_step_cpu_time']:.1f} %)"
            for part in ("compression", "selection")
        ]
        lines.append(
            f"| {shape} | {sr['seq_len']} / {sr['fast_seq_len']} | {sr['visual_tokens_per_image']:g} / "
            f"{sr['visual_tokens_kept_per_image']:g} | {sr['visual_units_per_image']:g} | "
            f"{sr['tower_flops'] / 1e9:.1f}, {1000 * sr['tower_seconds']:.0f} "
            f"({1000 * sr['tower_cpu_seconds']:.0f}) | "
            f"{parts[0]} | {parts[1]} | {sr['steps']} |"
        )
    lines += [
        "",
        "Kept visual tokens include LLaVA-NeXT's newline rows (never compressed). Compression: the sparse forward's "
        "work outside the model (layout, `compress_batch`, unit-by-unit selection and re-assembly); selection: the "
        "compressor's calls alone. Tower + projector: one `get_image_features` call without autograd (GFLOP: its "
        "forward, counted with eager attention). CPU time: this process's, less disturbed than the wall clock by "
        "other processes on a shared machine.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--steps", type=int, help="timed rounds (median reported; default: the shape's)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: the shape's)")
    parser.add_argument("--batch-size", type=int, help="samples per step (default: the shape's)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--compressor", default="divprune")
    parser.add_argument("--slow-mode-prob", type=float, default=0.1, help="share of slow steps in the mix")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    # One thread on CPU by default: with several, every small op waits at an OpenMP barrier whenever another process
    # holds a core, which inflates many-small-op steps (the sparse ones) far more than big-matmul steps.
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, all on GPU)")
    parser.add_argument("--output", default="benchmarks/results", help="where steps.{json,md} go")
    opts = vars(parser.parse_args(argv))
    shapes = [s.strip() for s in opts["shapes"].split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if opts["threads"] is None:
        opts["threads"] = 1 if opts["device"] == "cpu" else torch.get_num_threads()
    torch.set_num_threads(opts["threads"])
    out = Path(opts.pop("output"))
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": opts["device"],
            "threads": opts["threads"],
            "cpus": os.cpu_count(),
        },
        "options": opts,
        "shapes": {},
    }
    start = time.perf_counter()
    for name in shapes:
        sr = shape_report(time_variants(name, opts), opts["slow_mode_prob"])
        report["shapes"][name] = sr
        fast = sr["variants"]["fast"]
        print(
            f"[bench] {name}: fast {fast['speedup']:.2f}x ({100 * fast['fraction_of_ideal']:.0f} % of ideal), mix "
            f"{sr['variants']['mix']['speedup']:.2f}x, compression {100 * sr['compression_share_of_fast_step']:.1f} % "
            "of the fast step",
            flush=True,
        )
    report["total_seconds"] = time.perf_counter() - start
    (out / "steps.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = format_markdown(report)
    (out / "steps.md").write_text(markdown)
    print(markdown)
    print(f"[bench] wrote {out / 'steps.json'} and {out / 'steps.md'} ({report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

"""Step-time benchmark: stock `Trainer` vs sparse steps (token compression, DualSpeed, layer skipping), one run.

    python -m benchmarks.bench_steps                     # both shapes, writes benchmarks/results/steps.{json,md}
    python -m benchmarks.bench_steps --shapes vit196 --steps 5 --batch-size 2 --output outputs/bench-steps

Timings: every variant steps the same model on the same fixed batch, round-robin (stock, fast, slow, ... then again),
so machine load hits all variants alike; medians are reported. A step is `training_step` (forward + backward) plus the
optimizer step, with the vision tower frozen as in LLaVA-1.5 instruction tuning (projector and language model
trained). Memory: megabytes of activations saved for backward in one step (all devices) and, on CUDA, the step's
peak allocation. The DualSpeed mix is the expected step of the schedule (the schedule does not
depend on the data): `(1 - p) * fast + p * slow`. The FLOP-ideal speed-up counts matmul FLOPs of the same sequence
lengths (vision forward, projector and language model forward + backward, LM head at the positions computed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_sparse_mllm import SparseMLLMTrainer

# LLaVA-1.5 proportions at a size a CPU can step: the language model dominates the step, the tower is frozen.
_TINY_LM = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=4,
    vision_hidden_size=64,
    vision_layers=2,
    vision_feature_layer=-2,
)
SHAPES = {"llava15": dict(preset="llava15", **_TINY_LM), "vit196": dict(preset="vit196", **_TINY_LM)}
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


def build(shape: str, batch_size: int, text_tokens: int, device: str):
    from PIL import Image

    from hf_sparse_mllm.data.collator import VisionLanguageCollator
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    spec = dict(SHAPES[shape])
    model, processor = build_tiny_llava_and_processor(spec.pop("preset"), words=WORDS, **spec)
    model.model.vision_tower.requires_grad_(False)
    size = model.config.vision_config.image_size
    question = " ".join((WORDS * 20)[: max(text_tokens - 12, 1)])
    samples = [
        {
            "images": [Image.effect_noise((size, size), 40 + i).convert("RGB")],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": "what you see there"}]},
            ],
        }
        for i in range(batch_size)
    ]
    batch = VisionLanguageCollator(processor)(samples)
    return model.to(device), {k: v.to(device) for k, v in batch.items()}


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


def make_trainers(model, opts):
    from transformers import Trainer, TrainingArguments

    from hf_sparse_mllm import SparseMLLMConfig

    device = opts["device"]
    args = TrainingArguments(
        "outputs/bench/tmp", report_to="none", use_cpu=device == "cpu", learning_rate=1e-7, bf16=opts["bf16"]
    )
    layers = model.config.text_config.num_hidden_layers
    trainers = {}
    for name, (mode, fraction) in VARIANTS.items():
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
        trainers[name] = trainer
    return trainers


def one_step(trainer, model, batch, n_items):
    trainer.training_step(model, dict(batch), num_items_in_batch=n_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(shape, opts):
    from hf_sparse_mllm.compressors import get_compressor

    torch.manual_seed(0)
    device = opts["device"]
    model, batch = build(shape, opts["batch_size"], opts["text_tokens"], device)
    trainers = make_trainers(model, opts)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    times = {name: [] for name in trainers}
    for round_ in range(opts["warmup"] + opts["steps"]):
        for name, trainer in trainers.items():
            sync(device)
            start = time.perf_counter()
            one_step(trainer, model, batch, n_items)
            sync(device)
            if round_ >= opts["warmup"]:
                times[name].append(time.perf_counter() - start)
        print(f"[bench] {shape}: round {round_ + 1}/{opts['warmup'] + opts['steps']}", flush=True)

    # The compressor alone, on projected features of the batch's shape: the budget and the call are the registry's.
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    compressor = get_compressor(opts["compressor"])
    keep = compressor.budget(num_tokens=side * side, keep_ratio=opts["keep_ratio"], grid_size=(side, side))
    iso = trainers["fast"].sparse_config.num_isolator_tokens
    features = torch.randn(opts["batch_size"], side * side, model.config.text_config.hidden_size, device=device)
    compressor_times = []
    for _ in range(opts["steps"]):
        sync(device)
        start = time.perf_counter()
        compressor.compress(features, keep, generator=torch.Generator().manual_seed(0), grid_size=(side, side))
        sync(device)
        compressor_times.append(time.perf_counter() - start)
    flops = {name: ideal_flops(model, batch, name, keep, iso) for name in trainers}
    memory = {name: activation_megabytes(trainer, model, batch, n_items, device) for name, trainer in trainers.items()}
    return {
        "memory": memory,
        "times": times,
        "flops": flops,
        "keep": keep,
        "isolator_tokens": iso,
        "seq_len": batch["input_ids"].shape[1],
        "compressor_seconds": statistics.median(compressor_times),
        "decoder_layers": model.config.text_config.num_hidden_layers,
    }


# ---- FLOP model --------------------------------------------------------------------------------------------------


def lm_flops(model, batch, seq_len, logit_positions, layer_fraction=1.0, trained=True):
    """Matmul FLOPs of the language model over `batch` rows of `seq_len` tokens (x3 with backward)."""
    text = model.config.text_config
    lm = model.model.language_model
    per_token = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embed" not in n)
    tokens = batch * seq_len
    flops = layer_fraction * (
        2 * per_token * tokens + 4 * text.num_hidden_layers * batch * seq_len**2 * text.hidden_size
    )
    flops += 2 * text.hidden_size * text.vocab_size * logit_positions
    return flops * (3 if trained else 1)


def vision_flops(model, images):
    """Forward FLOPs of the frozen tower plus forward + backward of the projector."""
    v = model.config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    dense = sum(p.numel() for p in model.model.vision_tower.parameters() if p.dim() == 2)
    tower = 2 * dense * n * images + 4 * v.num_hidden_layers * images * n**2 * v.hidden_size
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters() if p.dim() == 2)
    return tower + 3 * 2 * proj * (n - 1) * images


def ideal_flops(model, batch, variant, keep, iso):
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    b, full_len = batch["input_ids"].shape
    answers = int((batch["labels"][:, 1:] != -100).sum())
    short_len = full_len - (n - keep - iso)
    mode, fraction = VARIANTS[variant]
    layers = model.config.text_config.num_hidden_layers
    kept = 1 - len(skip_set(layers, fraction)) / layers
    vision = vision_flops(model, b)
    if mode is None:
        return vision + lm_flops(model, b, full_len, b * full_len)
    if mode == "plain":
        return vision + lm_flops(model, b, full_len, answers, kept)
    if mode == "fast":
        return vision + lm_flops(model, b, short_len, answers, kept)
    # slow: teacher = fast forward without grad, student = full tokens; both full depth
    return 2 * vision + lm_flops(model, b, short_len, answers, trained=False) + lm_flops(model, b, full_len, answers)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llava15,vit196")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
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
    rows = []
    p = opts["slow_mode_prob"]
    for shape in opts["shapes"].split(","):
        res = time_variants(shape, opts)
        medians = {name: statistics.median(t) for name, t in res["times"].items()}
        flops = dict(res["flops"])
        for tag, fast in (("mix", "fast"), ("mix+skip25", "fast+skip25"), ("mix+skip50", "fast+skip50")):
            medians[tag] = (1 - p) * medians[fast] + p * medians["slow"]
            flops[tag] = (1 - p) * flops[fast] + p * flops["slow"]
        shape_report = {
            "seq_len": res["seq_len"],
            "visual_tokens_kept": res["keep"],
            "isolator_tokens": res["isolator_tokens"],
            "decoder_layers": res["decoder_layers"],
            "compressor_seconds": res["compressor_seconds"],
            "compressor_share_of_fast_step": res["compressor_seconds"] / medians["fast"],
            "variants": {},
        }
        for name, median in medians.items():
            speedup = medians["stock"] / median
            ideal = flops["stock"] / flops[name]
            if name.startswith("mix"):  # a mix's peak is its larger step's
                fast = name.replace("mix", "fast")
                activations, peak = (
                    max(a, b) if a is not None else None for a, b in zip(res["memory"][fast], res["memory"]["slow"])
                )
            else:
                activations, peak = res["memory"][name]
            entry = {
                "median_step_seconds": median,
                "samples_per_second": opts["batch_size"] / median,
                "speedup": speedup,
                "flop_ideal_speedup": ideal,
                "fraction_of_ideal": speedup / ideal,
                "saved_activations_mb": activations,
                "peak_memory_mb": peak,
            }
            if name in res["times"]:
                entry["step_times"] = res["times"][name]
            shape_report["variants"][name] = entry
            rows.append(
                (shape, name, median, opts["batch_size"] / median, speedup, ideal, speedup / ideal, activations, peak)
            )
        report["shapes"][shape] = shape_report
        print(
            f"[bench] {shape}: fast {medians['stock'] / medians['fast']:.2f}x, compressor "
            f"{100 * shape_report['compressor_share_of_fast_step']:.1f}% of the fast step",
            flush=True,
        )
    (out / "steps.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Median step time, batch {opts['batch_size']}, ~{opts['text_tokens']} text tokens, keep_ratio "
        f"{opts['keep_ratio']} ({opts['compressor']}, + 4 isolator tokens), vision tower frozen, device "
        f"{opts['device']}, {opts['threads']} threads. `skipNN`: NN % of the decoder layers skipped (fixed policy). "
        f"`mix`: expected step of the DualSpeed schedule with {100 * p:.0f} % slow steps.",
        "",
        "| shape | step | median s | samples/s | speed-up | FLOP-ideal | % of ideal | activations MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, name, median, sps, speedup, ideal, frac, activations, peak in rows:
        peak_text = "n/a (CPU)" if peak is None else f"{peak:.0f}"
        lines.append(
            f"| {shape} | {name} | {median:.3f} | {sps:.1f} | {speedup:.2f}x | {ideal:.2f}x | {100 * frac:.0f}% | "
            f"{activations:.0f} | {peak_text} |"
        )
    for shape, sr in report["shapes"].items():
        lines.append(
            f"\n{shape}: {sr['seq_len']} tokens per sequence in full mode, {sr['visual_tokens_kept']} visual tokens kept; "
            f"the compressor takes {1000 * sr['compressor_seconds']:.1f} ms = "
            f"{100 * sr['compressor_share_of_fast_step']:.1f} % of the fast step."
        )
    (out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[bench] wrote {out / 'steps.json'} and {out / 'steps.md'}")


if __name__ == "__main__":
    main()

"""Step-time benchmark: stock `Trainer` vs DualSpeed fast / slow steps and their mix, in one run on one machine.

    python scripts/benchmark.py                          # both shapes, writes outputs/bench/steps.{json,md}
    python scripts/benchmark.py --shapes vit196 --steps 5 --batch-size 2

Each variant runs in its own process (clean peak-memory reading), on the same fixed batch, with the vision tower
frozen as in LLaVA-1.5 instruction tuning (projector and language model trained). A step is `training_step`
(forward + backward) plus the optimizer step. Reported: median step time, samples/s, speed-up over the stock step,
the FLOP-ideal speed-up for the same sequence lengths, the compressor's own time, and peak memory (max RSS on CPU,
`max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

# LLaVA-1.5 proportions at a size a CPU can step: the language model dominates the step, the tower is frozen.
SHAPES = {
    "llava15": dict(
        preset="llava15",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        vision_hidden_size=64,
        vision_layers=2,
        vision_feature_layer=-2,
    ),
    "vit196": dict(
        preset="vit196",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        vision_hidden_size=64,
        vision_layers=2,
        vision_feature_layer=-2,
    ),
}
WORDS = "describe the picture in detail please and tell me what you see there".split()


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


def lm_flops(model, tokens: int, seq_len: int, batch: int, logit_positions: int, trained: bool) -> float:
    """Matmul FLOPs of the language model for `batch` sequences of `seq_len` (forward, x3 with backward)."""
    text = model.config.text_config
    lm = model.model.language_model
    dense = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embed" not in n)
    flops = 2 * dense * tokens + 4 * text.num_hidden_layers * batch * seq_len**2 * text.hidden_size
    flops += 2 * text.hidden_size * text.vocab_size * logit_positions
    return flops * (3 if trained else 1)


def vision_flops(model, images: int) -> float:
    """Forward matmul FLOPs of the frozen tower and the (trained) projector for `images` images."""
    v = model.config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    dense = sum(p.numel() for n_, p in model.model.vision_tower.named_parameters() if p.dim() == 2)
    tower = 2 * dense * n * images + 4 * v.num_hidden_layers * images * n**2 * v.hidden_size
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters() if p.dim() == 2)
    return tower + 3 * 2 * proj * (n - 1) * images


def ideal_flops(model, batch, variant: str, keep: int, iso: int) -> float:
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    b, full_len = batch["input_ids"].shape
    answers = int((batch["labels"][:, 1:] != -100).sum())
    short_len = full_len - (n - keep - iso)
    full = lm_flops(model, b * full_len, full_len, b, b * full_len, True)
    fast = lm_flops(model, b * short_len, short_len, b, answers, True)
    if variant == "stock":
        return vision_flops(model, b) + full
    if variant == "fast":
        return vision_flops(model, b) + fast
    # slow: teacher (fast, forward only) + student (full tokens, logits at answer positions only)
    student = lm_flops(model, b * full_len, full_len, b, answers, True)
    return 2 * vision_flops(model, b) + fast / 3 + student


def run_variant(queue, shape, variant, opts):
    torch.manual_seed(0)
    torch.set_num_threads(opts["threads"])
    from transformers import Trainer, TrainingArguments

    from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer

    device = opts["device"]
    model, batch = build(shape, opts["batch_size"], opts["text_tokens"], device)
    args = TrainingArguments(
        "outputs/bench/tmp", report_to="none", use_cpu=device == "cpu", learning_rate=1e-5, bf16=opts["bf16"]
    )
    if variant == "stock":
        trainer = Trainer(model=model, args=args)
    else:
        config = SparseMLLMConfig(
            token_compressor=opts["compressor"], keep_ratio=opts["keep_ratio"], slow_mode_prob=0.1, stage="instruction"
        )
        trainer = SparseMLLMTrainer(model=model, args=args, sparse_config=config)
        trainer.step_mode = lambda step, mode=variant: mode
    optimizer = trainer.create_optimizer()
    n_items = (batch["labels"][:, 1:] != -100).sum()
    times = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    total = opts["warmup"] + opts["steps"]
    for step in range(total):
        trainer.state.global_step = step
        sync()
        start = time.perf_counter()
        trainer.training_step(model, dict(batch), num_items_in_batch=n_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= opts["warmup"]:
            times.append(time.perf_counter() - start)
    result = {"times": times}
    if variant != "stock":
        keep, iso = trainer.num_keep, config.num_isolator_tokens
        result.update(keep=keep, iso=iso)
        features = torch.randn(
            opts["batch_size"], trainer.adapter.tokens_per_image(), trainer.adapter.hidden_size(), device=device
        )
        compressor_times = []
        for _ in range(opts["steps"]):
            sync()
            start = time.perf_counter()
            trainer.compressor.compress(
                features, keep, generator=torch.Generator().manual_seed(0), grid_size=trainer.adapter.grid_size()
            )
            sync()
            compressor_times.append(time.perf_counter() - start)
        result["compressor_seconds"] = statistics.median(compressor_times)
    else:
        result.update(keep=None, iso=0)
    result["ideal_flops"] = (
        {v: ideal_flops(model, batch, v, result["keep"] or 0, result["iso"]) for v in ("stock", "fast", "slow")}
        if variant != "stock"
        else None
    )
    result["seq_len"] = batch["input_ids"].shape[1]
    if device.startswith("cuda"):
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def measure(shape, variant, opts):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_variant, args=(queue, shape, variant, opts))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llava15,vit196")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    parser.add_argument("--slow-mode-prob", type=float, default=0.1, help="share of slow steps in the mix")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--compressor", default="divprune")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="outputs/bench")
    opts = vars(parser.parse_args(argv))
    out = Path(opts.pop("output"))
    out.mkdir(parents=True, exist_ok=True)
    rows, report = (
        [],
        {
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
        },
    )
    for shape in opts["shapes"].split(","):
        results = {}
        for variant in ("stock", "fast", "slow"):
            print(f"[bench] {shape}: {variant} ...", flush=True)
            results[variant] = measure(shape, variant, opts)
        # The mode schedule does not depend on the data, so the mix's expected step is the weighted mean.
        p = opts["slow_mode_prob"]
        medians = {v: statistics.median(r["times"]) for v, r in results.items()}
        medians["mix"] = (1 - p) * medians["fast"] + p * medians["slow"]
        results["mix"] = {
            **results["slow"],
            "times": [],
            "peak_memory_mb": max(results["fast"]["peak_memory_mb"], results["slow"]["peak_memory_mb"]),
        }
        flops = results["fast"]["ideal_flops"]
        ideal = {
            "stock": 1.0,
            "fast": flops["stock"] / flops["fast"],
            "slow": flops["stock"] / flops["slow"],
            "mix": flops["stock"] / ((1 - p) * flops["fast"] + p * flops["slow"]),
        }
        stock = medians["stock"]
        shape_report = {}
        for variant, res in results.items():
            median = medians[variant]
            speedup = stock / median
            shape_report[variant] = {
                "median_step_seconds": median,
                "samples_per_second": opts["batch_size"] / median,
                "speedup": speedup,
                "flop_ideal_speedup": ideal[variant],
                "fraction_of_ideal": speedup / ideal[variant],
                "peak_memory_mb": res["peak_memory_mb"],
                "seq_len": res["seq_len"],
                "step_times": res["times"],
            }
            if "compressor_seconds" in res and variant == "fast":
                shape_report[variant]["compressor_seconds"] = res["compressor_seconds"]
                shape_report[variant]["compressor_share_of_fast_step"] = res["compressor_seconds"] / median
            rows.append(
                (
                    shape,
                    variant,
                    median,
                    opts["batch_size"] / median,
                    speedup,
                    ideal[variant],
                    speedup / ideal[variant],
                    res["peak_memory_mb"],
                )
            )
        report["shapes"][shape] = shape_report
        fast = shape_report["fast"]
        print(
            f"[bench] {shape}: fast {fast['speedup']:.2f}x (ideal {fast['flop_ideal_speedup']:.2f}x), "
            f"compressor {100 * fast['compressor_share_of_fast_step']:.1f}% of the fast step",
            flush=True,
        )
    (out / "steps.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Step time, batch {opts['batch_size']}, ~{opts['text_tokens']} text tokens, keep_ratio {opts['keep_ratio']} "
        f"({opts['compressor']}), device {opts['device']}, {opts['threads']} threads. The mix is the expected step "
        f"of the DualSpeed schedule with {100 * opts['slow_mode_prob']:.0f} % slow steps.",
        "",
        "| shape | step | median s | samples/s | speed-up | FLOP-ideal | % of ideal | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, variant, median, sps, speedup, ideal_s, frac, mem in rows:
        lines.append(
            f"| {shape} | {variant} | {median:.3f} | {sps:.1f} | {speedup:.2f}x | {ideal_s:.2f}x | "
            f"{100 * frac:.0f}% | {mem:.0f} |"
        )
    (out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[bench] wrote {out / 'steps.json'} and {out / 'steps.md'}")


if __name__ == "__main__":
    main()

"""`hf-sparse-mllm analyze`: measure layer and visual-token redundancy of a model on a few batches (table, JSON, PNG).

    hf-sparse-mllm analyze --model path/to/llava --dataset data/train.jsonl
    hf-sparse-mllm analyze --model path/to/llava --dataset path/to/saved_dataset --split train
    hf-sparse-mllm analyze                       # the tiny offline model on generated VQA scenes

The dataset is read as `train` reads it (a `save_to_disk` folder, a JSON/JSONL/parquet file or a Hub id, in TRL's
conversational format, image paths relative to the data file). High input/output similarity marks decoder layers to
skip (`layer_skip_policy`); high neighbour similarity of visual tokens marks images whose tokens compress well
(`token_compressor`). The PNG plot needs matplotlib; without it the table and the JSON are still written.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import TrlParser

from .arguments import parse_or_exit


@dataclass
class AnalyzeArguments:
    model: str | None = field(
        default=None, metadata={"help": "Saved model folder or Hub id (default: a tiny offline LLaVA)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Dataset in the training format (default: generated VQA scenes at the model's geometry)."},
    )
    split: str = field(default="train", metadata={"help": "Split of --dataset."})
    batch_size: int = field(default=8, metadata={"help": "Samples per measured batch."})
    num_batches: int = field(default=4, metadata={"help": "Batches measured."})
    output: str = field(default="outputs/redundancy", metadata={"help": "Folder of the report files."})


def run(args: AnalyzeArguments):
    """Measure and write the report; return it ([`~hf_sparse_mllm.skipping.analysis.RedundancyReport`])."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..data.collator import VisionLanguageCollator
    from ..skipping.analysis import analyze_redundancy

    if args.model:
        model = AutoModelForImageTextToText.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
    else:
        from ..data.vqa import vqa_vocabulary
        from ..tiny import build_tiny_llava_and_processor

        model, processor = build_tiny_llava_and_processor("vit196", words=vqa_vocabulary())
    num_samples = args.batch_size * args.num_batches
    if args.dataset:
        from ..data.conversational import load_conversational_dataset

        data = load_conversational_dataset(args.dataset, split=args.split)
    else:
        from ..data.vqa import build_vqa_dataset

        size = model.config.vision_config.image_size
        patch = model.config.vision_config.patch_size
        data = build_vqa_dataset(num_train=num_samples, num_test=1, image_size=size, cell_size=patch)["train"]
    collator = VisionLanguageCollator(processor)
    rows = [data[i] for i in range(min(len(data), num_samples))]
    batches = (collator(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size))
    report = analyze_redundancy(model, batches, max_batches=args.num_batches)
    print(report.to_markdown())
    # matplotlib is no dependency of the package: the plot is drawn where it is installed.
    plot = importlib.util.find_spec("matplotlib") is not None
    if not plot:
        print("matplotlib is not installed: no redundancy.png (pip install matplotlib)")
    for path in report.save(args.output, plot=plot):
        print(f"wrote {path}")
    return report


def make_parser(prog: str = "hf-sparse-mllm analyze") -> TrlParser:
    return TrlParser(AnalyzeArguments, prog=prog, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    (args,) = parse_or_exit(parser, argv)
    for name in ("batch_size", "num_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    run(args)
    return 0


__all__ = ["AnalyzeArguments", "main", "make_parser", "run"]

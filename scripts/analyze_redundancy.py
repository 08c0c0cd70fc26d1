"""Measure layer and visual-token redundancy of a model on a few batches: a table, JSON and a PNG plot.

    python scripts/analyze_redundancy.py --model path/to/llava --dataset path/to/saved_dataset --split train
    python scripts/analyze_redundancy.py                      # the tiny offline model on generated VQA scenes

The dataset is a `datasets` folder (`save_to_disk`) in the TRL conversational format (`images` + `messages`).
High input/output similarity marks decoder layers to skip (`layer_skip_policy`); high neighbour similarity of
visual tokens marks images whose tokens compress well (`token_compressor`).
"""

import argparse

from datasets import load_from_disk
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.skipping.analysis import analyze_redundancy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved model folder or Hub id (default: a tiny offline LLaVA)")
    parser.add_argument("--dataset", help="dataset folder saved with save_to_disk (default: generated VQA scenes)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--output", default="outputs/redundancy")
    args = parser.parse_args(argv)

    if args.model:
        model = AutoModelForImageTextToText.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
    else:
        from hf_sparse_mllm.data.vqa import vqa_vocabulary
        from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

        model, processor = build_tiny_llava_and_processor("vit196", words=vqa_vocabulary())
    if args.dataset:
        data = load_from_disk(args.dataset)
        data = data[args.split] if hasattr(data, "keys") else data
    else:
        from hf_sparse_mllm.data.vqa import build_vqa_dataset

        size = model.config.vision_config.image_size
        patch = model.config.vision_config.patch_size
        data = build_vqa_dataset(
            num_train=args.batch_size * args.num_batches, num_test=1, image_size=size, cell_size=patch
        )["train"]
    collator = VisionLanguageCollator(processor)
    rows = [data[i] for i in range(min(len(data), args.batch_size * args.num_batches))]
    batches = (collator(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size))
    report = analyze_redundancy(model, batches, max_batches=args.num_batches)
    print(report.to_markdown())
    for path in report.save(args.output):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

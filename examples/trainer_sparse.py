"""Sparse training with the plain `transformers.Trainer` API: `SparseMLLMTrainer` (a `Trainer` subclass) and
`VisionLanguageCollator` (samples in TRL's conversational `images` + `messages` format, answer-only labels).

    # offline, on CPU: a tiny LLaVA built from a config and generated VQA scenes
    python examples/trainer_sparse.py --tiny --output_dir outputs/trainer-sparse-tiny

    # a saved model folder or Hub id, and a dataset in the conversational format (JSONL with image paths, parquet,
    # save_to_disk folder or Hub id), with a sparse recipe
    python examples/trainer_sparse.py --model_name_or_path llava-hf/llava-1.5-7b-hf --dataset_name data/train.jsonl \\
        --output_dir outputs/llava-sparse --per_device_train_batch_size 8 --bf16 \\
        --token_compressor divprune --keep_ratio 0.25 --slow_mode_prob 0.1 --layer_skip_policy stochastic

An existing `Trainer` script changes one class name (`Trainer` -> `SparseMLLMTrainer`) and passes `sparse_config=`.
The processor's chat template must mark the assistant turns with `{% generation %}` (the collator trains only the
answers); the tiny models' templates do.
"""

from dataclasses import dataclass, field

from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, TrainingArguments

from hf_sparse_mllm import SparseMLLMTrainer
from hf_sparse_mllm.cli import SparseArguments
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.data.samples import index_samples


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model folder or Hub id."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset in TRL's conversational format (file, folder or Hub id)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    tiny: bool = field(
        default=False,
        metadata={"help": "Train a tiny LLaVA built offline on generated VQA scenes (no download; CPU-sized)."},
    )


def load_model_and_dataset(args: ScriptArguments):
    if args.tiny:
        from hf_sparse_mllm.data.vqa import build_vqa_dataset, vqa_vocabulary
        from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

        model, processor = build_tiny_llava_and_processor("test", words=vqa_vocabulary())
        return model, processor, build_vqa_dataset(num_train=32, num_test=8, image_size=32, cell_size=8)["train"]
    if args.model_name_or_path is None or args.dataset_name is None:
        raise ValueError("Pass --model_name_or_path and --dataset_name, or --tiny.")
    from hf_sparse_mllm.data.conversational import load_conversational_dataset

    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    return model, processor, load_conversational_dataset(args.dataset_name, split=args.dataset_train_split)


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments, SparseArguments))
    script_args, training_args, sparse_args = parser.parse_args_into_dataclasses(argv)
    if script_args.tiny and training_args.max_steps < 0:
        training_args.max_steps = 4  # a CPU-sized run unless --max_steps says otherwise
    # The collator reads the `images` and `messages` columns, and the index column names bad samples in errors.
    training_args.remove_unused_columns = False
    model, processor, dataset = load_model_and_dataset(script_args)

    trainer = SparseMLLMTrainer(  # was: trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=index_samples(dataset),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
        sparse_config=sparse_args.to_config(seed=training_args.seed),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)  # weights, processor, sparse_mllm_config.json, model card
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main()

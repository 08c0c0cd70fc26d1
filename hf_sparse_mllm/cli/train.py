"""`hf-sparse-mllm train`: TRL's `trl sft` for vision-language models, with sparse training (`SparseSFTTrainer`).

    # a local JSONL file in the conversational format, images as paths relative to it
    hf-sparse-mllm train --model_name_or_path llava-hf/llava-1.5-7b-hf --dataset_name data/train.jsonl \\
        --output_dir outputs/llava-sparse --token_compressor divprune --keep_ratio 0.25 --slow_mode_prob 0.1 \\
        --layer_skip_policy redundancy --per_device_train_batch_size 8 --num_train_epochs 1

    # simple image/question/answer columns, LoRA, pushed to the Hub at the end
    hf-sparse-mllm train --model_name_or_path M --dataset_name qa.parquet --dataset_format simple \\
        --output_dir O --use_peft --lora_target_modules q_proj v_proj --push_to_hub

    # the same flags as YAML keys (flags given after it win)
    hf-sparse-mllm train --config recipe.yaml

The flags are those of TRL's `SFTConfig` and `ModelConfig` (model loading and LoRA), the dataset arguments below, and
every `SparseMLLMConfig` field (`--sparse_seed` for its seed, which defaults to `--seed`). Two `SFTConfig` defaults
differ, so that the command runs on any machine with its defaults: `--bf16` is on only where the hardware supports
bfloat16 (SFTConfig turns it on everywhere, and `TrainingArguments` then refuses to start on a CPU-only machine),
and `--max_length` is unset (as in TRL's VLM example: truncating a sample could cut its image tokens).
The model, the processor, `sparse_mllm_config.json` and the model card are saved into `--output_dir`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers.utils import is_torch_bf16_gpu_available
from trl import ModelConfig, SFTConfig, TrlParser

from ..data.conversational import CONVERSATIONAL
from .arguments import SparseArguments, parse_or_exit


@dataclass
class DatasetArguments:
    """Where the training data is and how to read it."""

    dataset_name: str = field(
        metadata={
            "help": "A save_to_disk folder, a JSON/JSONL/parquet/CSV file or a folder of them, or a Hub dataset id. "
            "Image columns may hold file paths, relative to the data file."
        }
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (with --eval_strategy)."})
    dataset_format: Literal["conversational", "simple"] = field(
        default=CONVERSATIONAL,
        metadata={
            "help": "conversational: TRL's `images` + `messages` columns. simple: one image, question and answer per "
            "row (--image_column, --question_column, --answer_column), turned into a user and an assistant turn."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of the simple format."})
    question_column: str = field(default="question", metadata={"help": "Question column of the simple format."})
    answer_column: str = field(default="answer", metadata={"help": "Answer column of the simple format."})
    collator: Literal["trl", "sparse"] = field(
        default="trl",
        metadata={
            "help": "trl: the collator SFTTrainer builds from the processor (as `trl sft`). sparse: "
            "hf_sparse_mllm's VisionLanguageCollator: answer-only loss (needs a chat template with {%% generation %%}), "
            "left padding where the tokenizer pads left, and bad samples named by their dataset index."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "With --collator sparse: drop unreadable samples with a warning instead of stopping."},
    )


@dataclass
class SFTArguments(SFTConfig):
    """`SFTConfig` with the two defaults the command line changes (see the module docstring)."""

    # SFTConfig sets bf16 whenever fp16 is off; TrainingArguments then raises on machines without bfloat16 support.
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on where the hardware supports bfloat16 (and --use_cpu is off), "
            "off otherwise (hf-sparse-mllm's default; SFTConfig turns it on whenever --fp16 is off)."
        },
    )
    # As TRL's VLM example sets it: truncation could cut an image's placeholder tokens.
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest tokenized sample; unset keeps whole samples (hf-sparse-mllm's default; SFTConfig: 1024)."
        },
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and not self.use_cpu and is_torch_bf16_gpu_available()
        super().__post_init__()


def make_parser(prog: str = "hf-sparse-mllm train") -> TrlParser:
    """The parser of `train`: TRL's `TrlParser` (`HfArgumentParser` plus `--config recipe.yaml`) over the dataset
    arguments, `SFTArguments`, TRL's `ModelConfig` and [`SparseArguments`]."""
    return TrlParser((DatasetArguments, SFTArguments, ModelConfig, SparseArguments), prog=prog)


def parse_args(argv: Sequence[str] | None = None):
    """`(dataset_args, training_args, model_args, sparse_config)` from flags and an optional `--config` YAML file.

    A value that cannot be parsed, an unknown flag or YAML key, or a value the sparse config rejects exits with
    argparse's usage error (status 2) naming it.
    """
    parser = make_parser()
    dataset_args, training_args, model_args, sparse_args = parse_or_exit(parser, argv)
    try:
        sparse_config = sparse_args.to_config(seed=training_args.seed)
    except ValueError as error:  # the config's own checks name the field, what it accepts and the value
        parser.error(str(error))
    if not model_args.model_name_or_path:
        parser.error("the following arguments are required: --model_name_or_path")
    if dataset_args.skip_bad_samples and dataset_args.collator != "sparse":
        parser.error("--skip_bad_samples needs --collator sparse (TRL's collator stops at the first bad sample).")
    return dataset_args, training_args, model_args, sparse_config


def _load_split(dataset_args: DatasetArguments, split: str):
    from ..data.conversational import load_conversational_dataset

    return load_conversational_dataset(
        dataset_args.dataset_name,
        split=split,
        dataset_config=dataset_args.dataset_config,
        dataset_format=dataset_args.dataset_format,
        image_column=dataset_args.image_column,
        question_column=dataset_args.question_column,
        answer_column=dataset_args.answer_column,
    )


def _load_model(model_args: ModelConfig, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import get_quantization_config

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    return model, processor


def _recipe_text(trainer) -> str:
    from ..hub import describe_recipe

    lines = [f"Sparse training recipe (stage: {trainer.stage}):"]
    lines += [f"  - {line}" for line in describe_recipe(trainer.sparse_config)]
    lines.append(json.dumps(trainer.sparse_config.recipe_dict(), sort_keys=True))
    return "\n".join(lines)


def _data(dataset_args: DatasetArguments, training_args: SFTArguments, processor) -> dict:
    """The trainer's `train_dataset`, `eval_dataset` and `data_collator` (`None`: TRL builds its own)."""
    data = dict(train_dataset=_load_split(dataset_args, dataset_args.dataset_train_split), data_collator=None)
    if training_args.eval_strategy != "no":
        data["eval_dataset"] = _load_split(dataset_args, dataset_args.dataset_test_split)
    if dataset_args.collator == "sparse":
        from ..data.collator import VisionLanguageCollator
        from ..data.samples import index_samples

        data["data_collator"] = VisionLanguageCollator(
            processor, max_length=training_args.max_length, skip_bad_samples=dataset_args.skip_bad_samples
        )
        data["train_dataset"] = index_samples(data["train_dataset"])  # so that bad-sample errors name the index
    return data


def train(dataset_args: DatasetArguments, training_args: SFTArguments, model_args: ModelConfig, sparse_config):
    """Load the model, its processor and the data, train with [`~hf_sparse_mllm.SparseSFTTrainer`], save everything
    into `training_args.output_dir` (and push it with `--push_to_hub`). Returns the trainer."""
    from trl import get_peft_config

    from .. import SparseSFTTrainer

    model, processor = _load_model(model_args, training_args.trust_remote_code)
    trainer = SparseSFTTrainer(
        model,
        training_args,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        sparse_config=sparse_config,
        **_data(dataset_args, training_args, processor),
    )
    trainer.accelerator.print(_recipe_text(trainer))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # A local path is no Hub dataset id: only a Hub id goes into the card's `datasets`.
    hub_dataset = None if os.path.exists(dataset_args.dataset_name) else dataset_args.dataset_name
    if hub_dataset is not None:
        trainer.create_model_card(dataset_name=hub_dataset)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model, processor, recipe and model card saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub_dataset)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")
    trainer.end()
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    train(*parse_args(argv))
    return 0


__all__ = ["DatasetArguments", "SFTArguments", "main", "make_parser", "parse_args", "train"]

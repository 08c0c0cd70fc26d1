"""TRL's vision-language SFT example (`examples/scripts/sft_vlm.py`) with sparse training: the one changed line is the
trainer class, `SparseSFTTrainer(..., sparse_config=...)` instead of `SFTTrainer(...)`, and the sparse recipe comes
from the command line as every other setting does.

    # offline, on CPU: a tiny LLaVA built from a config and generated VQA scenes
    python examples/sft_vlm_sparse.py --tiny --output_dir outputs/sft-vlm-sparse-tiny

    # LLaVA-1.5 on TRL's LLaVA-Instruct mix, DivPrune at 25 % of the visual tokens, DualSpeed, layer skipping
    accelerate launch examples/sft_vlm_sparse.py \\
        --dataset_name HuggingFaceH4/llava-instruct-mix-vsft --model_name_or_path llava-hf/llava-1.5-7b-hf \\
        --gradient_accumulation_steps 8 --output_dir LLaVA-1.5-7B-SFT-sparse --dtype bfloat16 \\
        --token_compressor divprune --keep_ratio 0.25 --slow_mode_prob 0.1 --layer_skip_policy redundancy

    # LoRA (the mode isolator is trained beside the adapter and never saved into it)
    python examples/sft_vlm_sparse.py --tiny --output_dir outputs/sft-vlm-sparse-lora --use_peft \\
        --lora_target_modules q_proj v_proj

The sparse flags are `SparseMLLMConfig`'s fields (`--sparse_seed` for its seed, which defaults to `--seed`); see
`hf-sparse-mllm train --help`, the command line built on the same parts.
"""

import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForImageTextToText
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from hf_sparse_mllm import SparseSFTTrainer
from hf_sparse_mllm.cli import SparseArguments


@dataclass
class ExampleArguments:
    tiny: bool = field(
        default=False,
        metadata={"help": "Train a tiny LLaVA built offline on generated VQA scenes (no download; CPU-sized)."},
    )


def tiny_model_and_dataset():
    """A tiny LLaVA (32 px images, 16 visual tokens) and generated VQA scenes in TRL's conversational format."""
    from hf_sparse_mllm.data.vqa import build_vqa_dataset, vqa_vocabulary
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    model, processor = build_tiny_llava_and_processor("test", words=vqa_vocabulary())
    dataset = build_vqa_dataset(num_train=32, num_test=8, image_size=32, cell_size=8)
    return model, processor, dataset


def main(argv=None):
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, SparseArguments, ExampleArguments))
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        # CPU-sized defaults (flags given on the command line still win): SFTConfig's bf16 needs a GPU.
        parser.set_defaults_with_config(bf16=False, max_steps=4, per_device_train_batch_size=4, logging_steps=1)
    script_args, training_args, model_args, sparse_args, example_args = parser.parse_args_and_config(argv)
    training_args.max_length = None

    ################
    # Model and dataset
    ################
    processor = None  # SFTTrainer loads the processor of a Hub model itself
    if example_args.tiny:
        model, processor, dataset = tiny_model_and_dataset()
    else:
        dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
        model_kwargs = dict(
            revision=model_args.model_revision, attn_implementation=model_args.attn_implementation, dtype=dtype
        )
        quantization_config = get_quantization_config(model_args)
        if quantization_config is not None:
            model_kwargs["quantization_config"] = quantization_config
        model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **model_kwargs)
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    ################
    # Training
    ################
    trainer = SparseSFTTrainer(  # was: trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        sparse_config=sparse_args.to_config(seed=training_args.seed),
    )

    trainer.train()

    # Save and push to hub (the model card and sparse_mllm_config.json come along)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main()

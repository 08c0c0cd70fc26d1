"""`SparseSFTTrainer`: TRL's `SFTTrainer` with the sparse training of `SparseMLLMTrainer`, sharing its code."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from .data.samples import SAMPLE_INDEX_KEY
from .trainer import SparseTrainingMixin


class SparseSFTTrainer(SparseTrainingMixin, SFTTrainer):
    r"""
    TRL's [`~trl.SFTTrainer`] with compressed visual tokens on fast steps, DualSpeed slow steps and layer skipping
    (see [`SparseMLLMTrainer`]; both run the same code).

    Everything `SFTTrainer` does stays: `SFTConfig` (including its handling of `remove_unused_columns` for
    conversational `images` + `messages` datasets), `peft_config`, the collator it builds from the processor,
    `max_length`, `assistant_only_loss` and `completion_only_loss`. Its logged metrics (`entropy`,
    `mean_token_accuracy`, `num_tokens`) keep coming on sparse steps, computed from the sparse forward's answer logits
    (`num_tokens` counts the batch's tokens as the data holds them). `packing`, `padding_free` and a `loss_type` other
    than `"nll"` cannot be combined with token compression (a `ValueError` at construction).

    Args:
        sparse_config ([`SparseMLLMConfig`], *optional*):
            The sparse recipe (defaults to `SparseMLLMConfig()`).
        *args, **kwargs:
            Passed to [`~trl.SFTTrainer`] unchanged.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from PIL import Image
    >>> from trl import SFTConfig
    >>> from hf_sparse_mllm import SparseMLLMConfig, SparseSFTTrainer
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> model, processor = build_tiny_llava_and_processor("test", words=["red", "what", "color"])
    >>> sample = {"images": [Image.new("RGB", (32, 32), "red")], "messages": [
    ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
    ...     {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    >>> args = SFTConfig("outputs/doctest-sft", max_steps=2, per_device_train_batch_size=2, report_to="none",
    ...                  bf16=False, gradient_checkpointing=False, save_strategy="no", use_cpu=True)
    >>> trainer = SparseSFTTrainer(  # was: SFTTrainer(
    ...     model=model, args=args, train_dataset=Dataset.from_list([sample] * 4), processing_class=processor,
    ...     sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25),
    ... )
    >>> trainer.train().global_step
    2

    ```
    """

    def __init__(self, model=None, args=None, *pargs, sparse_config=None, **kwargs):
        compressing = sparse_config is None or sparse_config.compression_enabled
        if (
            compressing
            and args is not None
            and (getattr(args, "packing", False) or getattr(args, "padding_free", False))
        ):
            raise ValueError(
                "packing=True / padding_free=True cannot be combined with visual token compression (a compressed "
                "forward shortens each sample's image spans, which packed sequences do not delimit): set "
                "packing=False and padding_free=False, or token_compressor=None."
            )
        if compressing and args is not None and getattr(args, "loss_type", "nll") != "nll":
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported with visual token compression: sparse steps compute "
                "their own cross-entropy (and distillation) loss. Use loss_type='nll', or token_compressor=None."
            )
        super().__init__(model, args, *pargs, sparse_config=sparse_config, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # The dataset index of `index_samples` survives TRL's column filter, so bad-sample errors can name it.
        if SAMPLE_INDEX_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SAMPLE_INDEX_KEY]

    def _stock_loss_is_scaled(self, num_items_in_batch) -> bool:
        # `SFTTrainer.compute_loss` normalises by `num_items_in_batch` itself whenever it is given.
        return num_items_in_batch is not None or self.compute_loss_func is not None

    def _record_answer_metrics(self, logits, targets, inputs) -> None:
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            device = logits.device
            num_valid = gather(torch.tensor(len(targets), device=device)).sum()
            entropy_sum = gather(entropy.sum()).sum()
            num_correct = gather((logits.argmax(-1) == targets).sum()).sum()
        metrics = self._metrics["train"]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(), device=device)
        self._total_train_tokens += gather(tokens).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

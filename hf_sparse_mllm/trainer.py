"""`SparseMLLMTrainer`: a drop-in `transformers.Trainer` that trains vision-language models on fewer visual tokens.

Reading order: `__init__` (attach the mode isolator, resolve the stage, check the arguments) -> `plan_step` (the
step's mode and skipped layers, a pure function of the seed and `state.global_step`) -> `training_step` (bypass
the skipped layers over forward and backward) -> `compute_loss` (plain, fast or slow forward through the wrapped
model, see `sparse_forward.py`) -> `log` (sparse metrics averaged across processes) -> saving and loading (isolator
and skip state saved beside, never inside, the weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints

from . import checkpoints, hub, model_parts
from .adapters import get_adapter, has_adapter
from .compat import load_checkpoint_weights
from .compressors import get_compressor
from .config import SparseMLLMConfig
from .data.collator import SKIPPED_SAMPLES_KEY
from .dualspeed import (
    FAST,
    SLOW,
    STREAM_SELECTION,
    ModeIsolator,
    distillation_kl_sum,
    next_token_targets,
    step_mode,
    step_random,
    token_ce_sum,
)
from .skipping import LayerSkipper
from .sparse_forward import Compression, compress_batch, sparse_hooks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """What one micro-batch of optimizer step `step` does.

    Args:
        step (`int`): the optimizer step (`state.global_step`).
        micro (`int`): the micro-batch's index in the gradient-accumulation window.
        mode (`str`): `"fast"` (compressed visual tokens) or `"slow"` (all tokens, distilled from the fast mode).
        skipped_layers (`tuple[int, ...]`): decoder layers not run.
        measuring (`bool`): whether the step measures layer redundancy (full depth).
    """

    step: int
    micro: int
    mode: str
    skipped_layers: tuple[int, ...] = ()
    measuring: bool = False


@dataclass
class StepHealth:
    """What the micro-batches of one optimizer step showed: checked before the optimizer step."""

    plan: StepPlan
    nonfinite_loss: bool = False
    trained_tokens: int = 0
    tokens_per_image: list[float] = field(default_factory=list)


class SparseMetrics:
    """Sums and counts of the sparse metrics since the last log, averaged over processes when logged."""

    KEYS = (
        "skipped_layers",
        "visual_tokens_per_image",
        "seq_len",
        "slow_step",
        "fast_ce",
        "teacher_ce",
        "student_ce",
        "kl",
    )

    COUNTERS = ("skipped_samples", "nonfinite_steps", "empty_batches")

    def __init__(self):
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.totals = defaultdict(float)
        self.samples = 0
        self.since = time.perf_counter()

    def record(self, name: str, value: float) -> None:
        self.sums[name] += float(value)
        self.counts[name] += 1

    def add(self, name: str, value: float) -> None:
        """A counter (summed since the last log, not averaged), e.g. `skipped_samples`."""
        self.totals[name] += float(value)

    def pop(self, sum_across_processes) -> dict[str, float]:
        """The averages (`sparse/<name>`) and `sparse/samples_per_second` since the last call; then start over."""
        stats = [self.sums[k] for k in self.KEYS] + [self.counts[k] for k in self.KEYS] + [self.samples]
        stats += [self.totals[k] for k in self.COUNTERS]
        stats = sum_across_processes(torch.tensor(stats, dtype=torch.float64)).tolist()
        n = len(self.KEYS)
        logs = {f"sparse/{k}": round(stats[i] / stats[n + i], 4) for i, k in enumerate(self.KEYS) if stats[n + i]}
        logs.update({f"sparse/{k}": stats[2 * n + 1 + i] for i, k in enumerate(self.COUNTERS) if k in self.totals})
        now = time.perf_counter()
        logs["sparse/samples_per_second"] = round(stats[2 * n] / max(now - self.since, 1e-9), 3)
        self.__init__()
        return logs


class SparseTrainingMixin:
    """The sparse training shared by [`SparseMLLMTrainer`] (over `transformers.Trainer`) and
    [`~hf_sparse_mllm.SparseSFTTrainer`] (over TRL's `SFTTrainer`): the step plan, the fast and slow forwards, the
    sparse metrics, and the training state saved beside the weights. It overrides only standard `Trainer` hooks and
    calls `super()` for everything it does not change."""

    # `compute_loss` returns a loss that is already scaled for gradient accumulation on every path, for every
    # architecture (the stock default depends on whether the model accepts loss kwargs).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *pargs, sparse_config=None, **kwargs):
        if model is None:
            raise ValueError(f"{type(self).__name__} needs `model` (model_init is not supported).")
        super().__init__(model, self._sparse_args(args), *pargs, **kwargs)
        if args is None:  # the parent built default arguments
            self.args = self._sparse_args(self.args)
        self._setup_sparse(self.model, sparse_config)
        self._check_processes()

    # ---- set-up (shared with SparseSFTTrainer) -----------------------------------------------------------------

    def _setup_sparse(self, model, sparse_config) -> None:
        if sparse_config is None:
            sparse_config = SparseMLLMConfig()
        if not isinstance(sparse_config, SparseMLLMConfig):
            raise TypeError(f"sparse_config must be a SparseMLLMConfig, got {type(sparse_config).__name__}.")
        self.sparse_config = sparse_config
        base = model_parts.base_model(model)
        # An adapter is needed for compression only: skipping and the stock path work on any model (and, where there
        # is one, it checks every batch's placeholders against its images).
        self.adapter = get_adapter(base) if sparse_config.compression_enabled or has_adapter(base) else None
        self.compressor = get_compressor(sparse_config.token_compressor) if sparse_config.compression_enabled else None
        self.stage = self._resolve_stage(base, sparse_config.stage)
        self.isolator = None
        if self.compressor is not None and sparse_config.num_isolator_tokens > 0:
            self.isolator = getattr(base, "sparse_mllm_isolator", None)
            if self.isolator is None:
                embed = base.get_input_embeddings().weight
                self.isolator = ModeIsolator(
                    sparse_config.num_isolator_tokens,
                    model_parts.text_hidden_size(base),
                    sparse_config.seed,
                    dtype=embed.dtype,
                ).to(embed.device)
                base.add_module("sparse_mllm_isolator", self.isolator)
        self._decoder = self.adapter.decoder() if self.adapter is not None else None
        self.layer_skipper = None
        if sparse_config.layer_skip_policy is not None:
            self._decoder = self._decoder or model_parts.decoder(base)
            num_layers = len(self._decoder.layers)
            sparse_config.check_decoder_depth(num_layers)
            self.layer_skipper = LayerSkipper(
                sparse_config.layer_skip_policy,
                sparse_config.skip_policy_fields(),
                num_layers,
                sparse_config.seed,
                always_run=model_parts.kv_store_layers(base),
            )
        self.image_token_id = _image_token_id(base)
        if self.data_collator is not None and self.image_token_id is not None:
            # Masked in the batches themselves, so that `Trainer` counts the trained tokens without them.
            self.data_collator = ImageLabelMasking(self.data_collator, self.image_token_id)
        _check_training_arguments(self.args, sparse_config, compute_loss_func=self.compute_loss_func)
        self._warn_if_zero3_moves_unused_parameters()
        self._plan: StepPlan | None = None
        self._window = (-1, 0)  # (optimizer step, micro-batches seen in it)
        self._sparse_metrics = SparseMetrics()
        self._image_label_warning = _WarnOnce()
        self._health: StepHealth | None = None
        self._nonfinite_in_a_row = 0
        logger.info(
            "%s: stage=%s compressor=%s keep_ratio=%s slow_mode_prob=%s isolator_tokens=%s layer_skip_policy=%s",
            type(self).__name__,
            self.stage,
            sparse_config.token_compressor,
            sparse_config.num_keep or sparse_config.keep_ratio,
            self.effective_slow_mode_prob,
            self.isolator.num_tokens if self.isolator is not None else 0,
            sparse_config.layer_skip_policy if self.layer_skipping_active else None,
        )

    @staticmethod
    def _sparse_args(args):
        # A fast step leaves the isolator or (with vision_feature_layer=-2) vision parameters without gradients.
        if args is not None and args.ddp_find_unused_parameters is None:
            args = copy.copy(args)
            args.ddp_find_unused_parameters = True
        return args

    def _check_processes(self) -> None:
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support torch.nn.DataParallel (several GPUs in one process): launch "
                "one process per GPU with `torchrun --nproc_per_node N` or `accelerate launch`."
            )

    def _warn_if_zero3_moves_unused_parameters(self) -> None:
        # DeepSpeed ZeRO-3 (0.19.8) applies a parameter's last gradient again on a step where it gets none
        # (docs/scaling_out.md, known issue 1); such parameters exist only with skipping or slow steps.
        unused = []
        if self.layer_skipping_active:
            unused.append("the decoder layers a step skips")
        if self.isolator is not None and self.effective_slow_mode_prob > 0:
            unused.append("the mode isolator on slow steps")
        if unused and is_deepspeed_zero3_enabled():
            logger.warning(
                "DeepSpeed ZeRO-3 moves a parameter that gets no gradient on a step by its previous gradient (an "
                "upstream bug, see docs/scaling_out.md): here %s, so this run does not train as the recipe says. "
                "Use ZeRO-2 or FSDP2 for layer skipping and DualSpeed.",
                " and ".join(unused),
            )

    @staticmethod
    def _resolve_stage(model, stage: str) -> str:
        if stage != "auto":
            return stage
        trains_lm = any(p.requires_grad for p in model_parts.decoder(model).parameters())
        return "instruction" if trains_lm else "alignment"

    @property
    def effective_slow_mode_prob(self) -> float:
        """Slow steps need a fast mode to distil from, and (stage-aware) happen in the instruction stage only."""
        if self.compressor is None or (self.sparse_config.stage_aware and self.stage == "alignment"):
            return 0.0
        return float(self.sparse_config.slow_mode_prob)

    @property
    def layer_skipping_active(self) -> bool:
        """Layer skipping (stage-aware) belongs to the instruction stage, where the language model is trained."""
        return self.layer_skipper is not None and not (self.sparse_config.stage_aware and self.stage == "alignment")

    # ---- the schedule ------------------------------------------------------------------------------------------

    def step_mode(self, step: int) -> str:
        """The mode (`"fast"` or `"slow"`) of optimizer step `step`: a pure function of the seed and the step."""
        return step_mode(self.sparse_config.seed, step, self.effective_slow_mode_prob)

    def skipped_layers(self, step: int, mode: str | None = None) -> tuple[int, ...]:
        """Decoder layers not run on optimizer step `step`: a pure function of the seed, the step and the last
        measured redundancy. Measuring steps, and slow steps (with their teacher) unless `skip_on_slow_steps`, run at
        full depth."""
        mode = self.step_mode(step) if mode is None else mode
        if not self.layer_skipping_active or (mode == SLOW and not self.sparse_config.skip_on_slow_steps):
            return ()
        return self.layer_skipper.decide(step)

    def plan_step(self, step: int, micro: int = 0) -> StepPlan:
        """The [`StepPlan`] of micro-batch `micro` of optimizer step `step` (override to force modes, e.g. in
        benchmarks)."""
        mode = self.step_mode(step)
        measuring = self.layer_skipping_active and self.layer_skipper.is_measuring_step(step)
        return StepPlan(step, micro, mode, self.skipped_layers(step, mode), measuring)

    # ---- training ----------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint=None,
        *args,
        allow_recipe_change: bool = False,
        restart_isolator: bool = False,
        **kwargs,
    ):
        """[`~transformers.Trainer.train`], resuming the sparse state too.

        `resume_from_checkpoint=True` takes the newest *complete* checkpoint (present on every process, for
        `save_on_each_node` without shared storage) and says which incomplete ones it passed over. Resuming with a
        recipe that differs from the checkpoint's in a field that changes decisions or the loss is an error naming the
        fields and their two values, unless `allow_recipe_change=True` (the saved recipe's `resume_note` and the
        model card then record the change). A checkpoint of a run with a mode isolator must hold it: resuming without
        it is an error, unless `restart_isolator=True` (the isolator then restarts from its initial value).
        """
        if self.isolator is not None and self.optimizer is not None:
            if not any(p is self.isolator.tokens for group in self.optimizer.param_groups for p in group["params"]):
                raise ValueError(
                    f"The optimizer passed to {type(self).__name__} does not hold the mode isolator "
                    "(`model.sparse_mllm_isolator.tokens`): build it after creating the trainer, or let the trainer "
                    "create it."
                )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._newest_complete_checkpoint()
        if resume_from_checkpoint:
            # Here rather than in `_load_from_checkpoint`, which DeepSpeed runs skip.
            self._load_sparse_state(resume_from_checkpoint, allow_recipe_change, restart_isolator)
        self._sparse_metrics.since = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.create_model_card()  # the card describes the finished run too (main process only)
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        micro = self._window[1] if self._window[0] == step else 0
        self._window = (step, micro + 1)
        plan = self.plan_step(step, micro)
        if micro == 0:
            self._health = StepHealth(plan)
            if self.accelerator.num_processes > 1:
                self._check_same_plan_on_every_process(plan)
        labels = inputs.get("labels")
        if labels is not None:
            trained = int((labels[..., 1:] != -100).sum())
            self._health.trained_tokens += trained
            if trained == 0 and num_items_in_batch is None:
                # The model's mean over no token would be 0 / 0: a sum over none, divided by one, is the zero it is.
                num_items_in_batch = torch.ones((), dtype=torch.long, device=labels.device)
        self._sparse_metrics.samples += int(inputs["input_ids"].shape[0]) if "input_ids" in inputs else 0
        if self.layer_skipping_active:
            self._sparse_metrics.record("skipped_layers", len(plan.skipped_layers))
        with contextlib.ExitStack() as stack:
            if self.layer_skipping_active:
                # Spans forward and backward: activation checkpointing replays forwards during backward.
                stack.enter_context(self.layer_skipper.during_micro_step(plan, self._decoder))
            self._plan = plan
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._plan = None
        self._health.nonfinite_loss |= not bool(torch.isfinite(loss).all())
        if plan.measuring and not self.layer_skipper.finish_measurement(step, self._sum_across_processes):
            logger.warning(
                "Non-finite layer redundancy measured at step %d (%s step): the previous measurement stays in use and "
                "the next step measures again.",
                step,
                plan.mode,
            )
            self._count_step("nonfinite_steps")
        return loss

    # ---- before the optimizer step -----------------------------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        # The training loop computes the gradient norm once per optimizer step, just before `optimizer.step()`: the
        # place to drop a step whose loss or gradients are not finite, or that trains no token.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self._health is not None:
            self._check_step_health(model, grad_norm)
        return grad_norm

    def _check_step_health(self, model, grad_norm) -> None:
        health, self._health = self._health, None
        norm = float(grad_norm) if grad_norm is not None else 0.0
        nonfinite = health.nonfinite_loss or not math.isfinite(norm)
        flags = self._sum_across_processes(torch.tensor([float(nonfinite), float(health.trained_tokens)]))
        plan = health.plan
        if flags[1] == 0:
            logger.warning("Step %d trains no token (every label is -100): the optimizer step is skipped.", plan.step)
            self._drop_gradients(model)
            self._count_step("empty_batches")
            return
        if flags[0] == 0:
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        limit = self.sparse_config.max_nonfinite_steps
        kept = ", ".join(f"{t:g}" for t in health.tokens_per_image) or "all"
        logger.warning(
            "Non-finite %s at step %d (%s step, skipped layers %s, visual tokens per image %s): the optimizer step is "
            "skipped (%d in a row; training stops at %d).",
            "loss" if health.nonfinite_loss else f"gradient norm ({norm})",
            plan.step,
            plan.mode,
            list(plan.skipped_layers),
            kept,
            self._nonfinite_in_a_row,
            limit,
        )
        self._drop_gradients(model)
        self._count_step("nonfinite_steps")
        if self._nonfinite_in_a_row >= limit:
            self.log(self._sparse_metrics.pop(self._sum_across_processes))  # the counters reach the logs first
            raise RuntimeError(
                f"{self._nonfinite_in_a_row} consecutive optimizer steps had a non-finite loss or gradient (the last "
                f"at step {plan.step}, a {plan.mode} step skipping layers {list(plan.skipped_layers)}): stopping "
                f"(SparseMLLMConfig.max_nonfinite_steps={limit}). Check for inf/NaN weights or a too-high learning rate."
            )

    def _drop_gradients(self, model) -> None:
        """Make `optimizer.step()` a no-op: optimizers skip parameters without a gradient."""
        if self.is_deepspeed_enabled:
            logger.warning("DeepSpeed keeps its own gradients: this step cannot be skipped here.")
        for parameter in model.parameters():
            parameter.grad = None

    def _count_step(self, name: str) -> None:
        # Step-level events are the same on every process: count them once.
        if self.accelerator.is_main_process:
            self._sparse_metrics.add(name, 1)

    def _check_same_plan_on_every_process(self, plan: StepPlan) -> None:
        """Fail loudly, not with a hang or silently halved gradients, if processes ever disagree on a step's plan.

        Decisions are pure functions of the seed, the step and state averaged across processes, so this only catches
        a bug or processes started with different recipes; it costs one small all-gather per optimizer step.
        """
        skipped = torch.zeros(self.layer_skipper.num_layers if self.layer_skipper is not None else 0)
        skipped[list(plan.skipped_layers)] = 1
        mine = torch.cat([torch.tensor([plan.step, plan.mode == SLOW, plan.measuring]), skipped])
        every = self.accelerator.gather(mine.to(self.args.device).unsqueeze(0)).cpu()
        if not bool((every == every[0]).all()):
            described = [
                f"process {rank}: mode={'slow' if row[1] else 'fast'}, measuring={bool(row[2])}, "
                f"skipped layers {row[3:].nonzero().flatten().tolist()}"
                for rank, row in enumerate(every)
            ]
            raise RuntimeError(
                f"Processes disagree on the plan of optimizer step {plan.step} (same seed and recipe expected on every "
                f"process): {'; '.join(described)}."
            )

    def _sum_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return values.cpu()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plan = self._plan
        if plan is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # evaluation, prediction
        inputs = self._mask_image_labels(inputs)
        if self.compressor is None:
            # With an adapter: a clear error when the placeholders do not match the images, and, for a micro-batch
            # without images, the vision modules run on a blank image as on every other process (sharded engines).
            text_only = self.adapter is not None and "input_ids" in inputs and not self.adapter.layout(inputs).runs
            hooks = sparse_hooks(self.adapter, text_only=True) if text_only else contextlib.nullcontext()
            with hooks:
                loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            if not self._stock_loss_is_scaled(num_items_in_batch):
                loss = loss / self._accumulation_steps()
            self._sparse_metrics.record("slow_step", 0.0)
            if "input_ids" in inputs:
                self._sparse_metrics.record("seq_len", inputs["input_ids"].shape[1])
            return loss
        return self._sparse_loss(model, inputs, plan, num_items_in_batch)

    def _stock_loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the parent's `compute_loss` already scales its loss for gradient accumulation (`Trainer`'s rule)."""
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _mask_image_labels(self, inputs: dict) -> dict:
        """Batches that did not come through the trainer's collator (e.g. `training_step` called directly)."""
        if self.image_token_id is None:
            return inputs
        return mask_image_labels(inputs, self.image_token_id, self._image_label_warning)

    def _prepare_inputs(self, inputs):
        skipped = inputs.pop(SKIPPED_SAMPLES_KEY, None) if isinstance(inputs, dict) else None
        if skipped is not None and self.model.training:
            self._sparse_metrics.add("skipped_samples", float(skipped))
        return super()._prepare_inputs(inputs)

    def _sparse_loss(self, model, inputs, plan: StepPlan, num_items_in_batch):
        if "position_ids" in inputs and inputs.get("attention_mask") is None:
            raise ValueError(
                "Packed (padding-free) batches are not supported with token compression: pass padded batches with "
                "an attention_mask."
            )
        record = self._sparse_metrics.record
        layout = self.adapter.layout(inputs)
        fast = self._fast_compression(plan)
        if plan.mode == FAST:
            logits, targets, seq_len, tokens_per_image = self._answer_logits(model, inputs, layout, fast)
            total = token_ce_sum(logits, targets)
            record("fast_ce", total.item() / max(len(targets), 1))
        else:
            with torch.no_grad():
                teacher_logits, teacher_targets, _, _ = self._answer_logits(model, inputs, layout, fast)
            logits, targets, seq_len, tokens_per_image = self._answer_logits(model, inputs, layout, None)
            if not torch.equal(teacher_targets, targets):
                raise RuntimeError("Teacher and student answer tokens differ; the prompts must differ only in images.")
            student_ce = token_ce_sum(logits, targets)
            kl = distillation_kl_sum(logits, teacher_logits, self.sparse_config.distill_temperature)
            total = student_ce + self.sparse_config.distill_weight * kl
            n = max(len(targets), 1)
            record("teacher_ce", token_ce_sum(teacher_logits, targets).item() / n)
            record("student_ce", student_ce.item() / n)
            record("kl", kl.item() / n)
        if layout.runs:
            record("visual_tokens_per_image", tokens_per_image)
            if self._health is not None:
                self._health.tokens_per_image.append(tokens_per_image)
        record("slow_step", float(plan.mode == SLOW))
        record("seq_len", seq_len)
        self._record_answer_metrics(logits.detach(), targets, inputs)
        return self._scale_summed_loss(total, len(targets), num_items_in_batch)

    def _record_answer_metrics(self, logits, targets, inputs) -> None:
        """Metrics the parent trainer computes from its own forward (`SparseSFTTrainer`: TRL's entropy, token
        accuracy and token count), here from the sparse forward's answer logits."""

    def _fast_compression(self, plan: StepPlan) -> Compression:
        config = self.sparse_config
        seed = int(step_random(config.seed, STREAM_SELECTION, plan.step, plan.micro).integers(2**62))
        return Compression(self.compressor, config.keep_ratio, config.num_keep, seed, self.isolator)

    def _answer_logits(self, model, inputs, layout, compression: Compression | None):
        """Run the wrapped `model` in fast (`compression`) or full mode. Returns the logits and targets at the answer
        positions, the sequence length and the visual tokens per image the language model saw."""
        batch = compress_batch(self.adapter, inputs, compression, layout) if compression is not None else None
        model_inputs = batch.inputs if batch is not None else inputs
        targets = next_token_targets(model_inputs["labels"])
        positions = targets != -100
        # Without images, the vision modules still run (on a blank image), as on every other process.
        with sparse_hooks(self.adapter, batch, compression, logit_positions=positions, text_only=not layout.runs):
            outputs = model(**{k: v for k, v in model_inputs.items() if k != "labels"}, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        images = max(layout.num_images, 1)
        per_image = batch.visual_tokens_per_image if batch is not None else sum(r.length for r in layout.runs) / images
        return logits, targets[positions], model_inputs["input_ids"].shape[1], per_image

    def _scale_summed_loss(self, total, n_local_tokens, num_items_in_batch):
        """Normalise a summed loss exactly as the stock Trainer normalises a model's loss."""
        if num_items_in_batch is not None:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss
        return total / max(n_local_tokens, 1) / self._accumulation_steps()

    def _accumulation_steps(self) -> int:
        # Set by the training loop for the current window (the last one may be shorter).
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    # ---- logging -----------------------------------------------------------------------------------------------

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        super()._maybe_log_save_evaluate(*args, **kwargs)
        # Logging, evaluation and checkpointing are not training: keep them out of sparse/samples_per_second.
        if self._sparse_metrics.samples == 0:  # just logged: the next interval starts now
            self._sparse_metrics.since = time.perf_counter()
        else:
            self._sparse_metrics.since += time.perf_counter() - start

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.model.training:
            logs.update(self._sparse_metrics.pop(self._sum_across_processes))
        if "train_runtime" in logs and self.layer_skipping_active:
            # End of training: how often each decoder layer was skipped.
            frequencies = self.layer_skipper.skip_frequencies(self.state.global_step)
            for layer, frequency in enumerate(frequencies):
                logs[f"sparse/skip_frequency/layer_{layer:02d}"] = round(frequency, 4)
        super().log(logs, start_time)

    # ---- saving and resuming -----------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # The recipe travels with the model as a plain dict on config.json; the base model_type and weights are
        # untouched. From now on `model.push_to_hub()` also uploads the recipe, the processor and our model card.
        card_kwargs = hub.trainer_model_card_kwargs(self, **self._card_kwargs)
        hub.bind_push_to_hub(self.model, self.sparse_config, processor=self.processing_class, card_kwargs=card_kwargs)
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.sparse_config.save_pretrained(output_dir)
            card = hub.render_model_card(self.sparse_config, **card_kwargs)
            card.save(os.path.join(output_dir, hub.MODEL_CARD_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        limit = self.args.save_total_limit
        # The stock rotation would run before this checkpoint is complete: keep one more until it is.
        self.args.save_total_limit = limit + 1 if limit else limit
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process has written its part of the stock checkpoint
        isolator = self._gathered_isolator() if self.isolator is not None else None  # a collective when sharded
        if self.args.should_save:
            self._save_sparse_state(folder, isolator)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)

    @property
    def _card_kwargs(self) -> dict:
        # What `create_model_card` was told (speed-up, eval results, dataset, ...), reused for every later card.
        return self.__dict__.setdefault("_sparse_card_kwargs", {})

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **card_kwargs,
    ) -> None:
        """Write this package's model card (recipe, speed-up, evaluation results) to `output_dir/README.md`.

        Replaces the stock card, which `Trainer.push_to_hub` would otherwise rewrite on every push. Takes the stock
        arguments (`tasks` and `dataset_args` are unused) and those of [`~hf_sparse_mllm.hub.render_model_card`],
        e.g. `speedup`, `baseline_samples_per_second` and `eval_results`; `trainer.push_to_hub(**kwargs)` passes its
        keyword arguments here. They are remembered for the cards written at later checkpoints.
        """
        if not self.is_world_process_zero():
            return
        given = dict(language=language, license=license, tags=tags, model_name=model_name, base_model=finetuned_from)
        given.update(datasets=dataset_tags or dataset, **card_kwargs)
        self._card_kwargs.update({k: v for k, v in given.items() if v is not None})
        os.makedirs(self.args.output_dir, exist_ok=True)
        hub.trainer_model_card(self, **self._card_kwargs).save(os.path.join(self.args.output_dir, hub.MODEL_CARD_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The stock push copies only the weights and config.json from the checkpoint into output_dir before uploading
        # output_dir: bring the recipe and the model card along.
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END:
            hub.copy_sparse_files(checkpoint_folder, self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def _gathered_isolator(self) -> torch.Tensor:
        """The whole isolator on CPU; every process calls this (FSDP2 and ZeRO-3 hold a shard of it each)."""
        tokens = self.isolator.tokens
        if hasattr(tokens, "full_tensor"):  # an FSDP2 DTensor
            return tokens.full_tensor().detach().cpu().contiguous()
        if hasattr(tokens, "ds_id"):  # a DeepSpeed ZeRO-3 partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([tokens]):
                return tokens.detach().cpu().clone()
        return tokens.detach().cpu().contiguous()

    def _save_sparse_state(self, folder: str, isolator: torch.Tensor | None = None) -> None:
        """Training state that is not model weights (the isolator, gathered by `_gathered_isolator`, the layer-skip
        state, the recipe), written last and atomically: its state file marks the checkpoint complete."""
        os.makedirs(folder, exist_ok=True)
        if isolator is not None:
            tokens = {"tokens": isolator}
            path = os.path.join(folder, checkpoints.ISOLATOR_FILE)
            checkpoints.atomic_write(path, lambda temporary: save_file(tokens, temporary))
        state = {
            "step": self.state.global_step,
            "recipe": self.sparse_config.recipe_dict(),
            "has_isolator": self.isolator is not None,
            "layer_skipper": self.layer_skipper.state_dict() if self.layer_skipper is not None else None,
        }
        checkpoints.write_state(folder, state)

    def _newest_complete_checkpoint(self) -> str:
        found = checkpoints.checkpoints_by_step(self.args.output_dir)
        complete = {step for step, folder in found.items() if checkpoints.is_complete(folder)}
        if self.accelerator.num_processes > 1:  # without shared storage, each node sees its own folders
            complete = set.intersection(*(set(steps) for steps in gather_object([sorted(complete)])))
        if not complete:
            raise ValueError(
                f"resume_from_checkpoint=True found no complete checkpoint in {self.args.output_dir} (folders: "
                f"{sorted(os.path.basename(f) for f in found.values()) or 'none'}; a complete one holds "
                f"{checkpoints.STATE_FILE} and trainer_state.json)."
            )
        newest = max(complete)
        passed_over = sorted(os.path.basename(found[s]) for s in found if s > newest)
        if passed_over:
            logger.warning("Resuming from checkpoint-%d; passed over incomplete checkpoints %s.", newest, passed_over)
        return found[newest]

    def _load_sparse_state(self, folder: str, allow_recipe_change=False, restart_isolator=False) -> None:
        state = checkpoints.read_state(folder)
        if state is None:
            logger.warning("%s has no %s (not written by this package): the sparse state starts fresh.", folder,
                           checkpoints.STATE_FILE)  # fmt: skip
            state = {}
        self._check_recipe_on_resume(folder, state, allow_recipe_change)
        if self.layer_skipper is not None and state.get("layer_skipper"):
            self.layer_skipper.load_state_dict(state["layer_skipper"])
        if self.isolator is None:
            return
        path = os.path.join(folder, checkpoints.ISOLATOR_FILE)
        if os.path.isfile(path):
            with torch.no_grad():
                self.isolator.tokens.copy_(load_file(path)["tokens"])
        elif restart_isolator:
            logger.warning("No %s in %s: the mode isolator restarts from its initial value.",
                           checkpoints.ISOLATOR_FILE, folder)  # fmt: skip
        else:
            raise ValueError(
                f"{folder} holds no mode isolator ({checkpoints.ISOLATOR_FILE}) although this recipe trains one "
                f"(num_isolator_tokens={self.sparse_config.num_isolator_tokens}): resuming would restart it from "
                "scratch. Pass train(..., restart_isolator=True) to accept that."
            )

    def _check_recipe_on_resume(self, folder: str, state: dict, allow_recipe_change: bool) -> None:
        if state.get("recipe") is None:
            return
        changes = checkpoints.recipe_changes(state["recipe"], self.sparse_config.recipe_dict())
        if not changes:
            return
        described = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        if not allow_recipe_change:
            raise ValueError(
                f"The recipe differs from the one {folder} was trained with: {described} (checkpoint -> now). "
                "Sparse decisions are a pure function of the seed, the step and the recipe, so the resumed run would "
                "not continue the same training. Resume with the checkpoint's recipe, or pass "
                "train(..., allow_recipe_change=True) to continue with the new one (the saved recipe and the model "
                "card record the change)."
            )
        note = f"at step {state.get('step')}, {described}"
        logger.warning("Resuming %s with a changed recipe: %s.", folder, described)
        previous = self.sparse_config.resume_note
        self.sparse_config.resume_note = f"{previous}; {note}" if previous else note

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        result = None if self.is_fsdp_enabled else load_checkpoint_weights(model, resume_from_checkpoint)
        if result is not None:
            self._issue_warnings_after_load(result)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            result = load_checkpoint_weights(self.model, best)
            if result is not None:
                logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
                self._issue_warnings_after_load(result)
                return
        super()._load_best_model()


class SparseMLLMTrainer(SparseTrainingMixin, Trainer):
    r"""
    A [`~transformers.Trainer`] that trains vision-language models with compressed visual tokens (fast steps) and,
    in the instruction stage, occasional all-token steps distilled from the fast mode (slow steps, DualSpeed); and,
    with a `layer_skip_policy`, without some decoder layers on a step.

    Everything else is the stock `Trainer`: evaluation, prediction and the saved model use all visual tokens, and
    with `token_compressor=None` and no skipping training is identical to `Trainer`. Labels on image placeholder
    tokens are never trained (they cannot be predicted, and their number changes on fast steps): they are masked,
    with a warning the first time.

    Args:
        sparse_config ([`SparseMLLMConfig`], *optional*):
            The sparse recipe. Defaults to `SparseMLLMConfig()` (DivPrune keeping 25 % of the visual tokens, 10 %
            slow steps in the instruction stage).
        peft_config (`peft.PeftConfig`, *optional*):
            Wrap the model with `peft.get_peft_model` first (as `SFTTrainer` does); the mode isolator is trained beside
            the adapter and never saved into it. A model already wrapped with `get_peft_model` works as well.
        *args, **kwargs:
            Passed to [`~transformers.Trainer`] unchanged.

    Example:

    ```python
    >>> from transformers import TrainingArguments
    >>> from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
    >>> from hf_sparse_mllm.data.collator import VisionLanguageCollator
    >>> from hf_sparse_mllm.tiny import build_tiny_llava_and_processor
    >>> from PIL import Image
    >>> model, processor = build_tiny_llava_and_processor("test", words=["red", "what", "color"])
    >>> sample = {
    ...     "images": [Image.new("RGB", (32, 32), "red")],
    ...     "messages": [
    ...         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
    ...         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ...     ],
    ... }
    >>> args = TrainingArguments("outputs/doctest", max_steps=2, per_device_train_batch_size=2, report_to="none",
    ...                          remove_unused_columns=False, save_strategy="no", use_cpu=True)
    >>> trainer = SparseMLLMTrainer(
    ...     model=model, args=args, train_dataset=[sample] * 4, data_collator=VisionLanguageCollator(processor),
    ...     sparse_config=SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.25),
    ... )
    >>> trainer.train().global_step
    2
    ```
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *pargs, peft_config=None, **kwargs):
        if peft_config is not None:
            model = _wrap_with_peft(model, peft_config)
        super().__init__(model, args, *pargs, **kwargs)


class _WarnOnce:
    def __init__(self):
        self.warned = False


def mask_image_labels(batch: dict, image_token_id: int, warning: _WarnOnce | None = None) -> dict:
    """`batch` with labels of -100 on the image placeholder tokens, which are never meaningful targets (they cannot
    be predicted, and their number changes on fast steps); a warning the first time any are found."""
    labels, input_ids = batch.get("labels"), batch.get("input_ids")
    if labels is None or input_ids is None:
        return batch
    on_images = (input_ids == image_token_id) & (labels != -100)
    if not bool(on_images.any()):
        return batch
    if warning is not None and not warning.warned:
        warning.warned = True
        logger.warning(
            "The batch has labels on %d image placeholder tokens (id %d); they are not trained (set to -100). "
            "Mask them in the collator to silence this warning.",
            int(on_images.sum()),
            image_token_id,
        )
    return {**batch, "labels": labels.masked_fill(on_images, -100)}


class ImageLabelMasking:
    """A data collator wrapper applying [`mask_image_labels`] to every batch (the trainers wrap theirs with it)."""

    def __init__(self, collator, image_token_id: int):
        self.collator = collator
        self.image_token_id = image_token_id
        self.warning = _WarnOnce()

    def __call__(self, features):
        return mask_image_labels(self.collator(features), self.image_token_id, self.warning)

    def __getattr__(self, name):
        # The wrapped collator's attributes (`tokenizer`, `processor`, ...), which `Trainer` and users read.
        if name == "collator":  # not set yet (e.g. while unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)


def _wrap_with_peft(model, peft_config):
    """`get_peft_model(model, peft_config)`, as `SFTTrainer` does with its `peft_config` argument."""
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError:
        raise ImportError("peft_config needs the `peft` package: `pip install peft`.") from None
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    if model_parts.base_model(model) is not model:
        raise ValueError("The model is already a PeftModel: pass either it or peft_config, not both.")
    return get_peft_model(model, peft_config)


def _image_token_id(model) -> int | None:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _check_training_arguments(args, sparse_config, compute_loss_func=None) -> None:
    """Combinations that would silently train something else, or crash deep inside torch."""
    if sparse_config.compression_enabled and (compute_loss_func is not None or args.label_smoothing_factor):
        raise ValueError(
            "Sparse (fast/slow) steps compute their own cross-entropy and distillation loss: compute_loss_func and "
            "label_smoothing_factor are not supported with token compression (set token_compressor=None to use them)."
        )
    if sparse_config.layer_skip_policy is not None and args.ddp_static_graph:
        raise ValueError(
            "ddp_static_graph=True cannot be combined with layer skipping: the set of used layers changes."
        )
    checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    kwargs = (
        getattr(args, "activation_checkpointing_kwargs", None)
        or getattr(args, "gradient_checkpointing_kwargs", None)
        or {}
    )
    if checkpointing and kwargs.get("use_reentrant") and args.world_size > 1:
        raise ValueError(
            "Reentrant activation checkpointing hides parameters from DDP's unused-parameter search, which sparse "
            "steps need: pass activation_checkpointing_kwargs={'use_reentrant': False}."
        )

"""`SparseMLLMTrainer`: a drop-in `transformers.Trainer` that trains vision-language models on fewer visual tokens.

Reading order: `__init__` (attach the mode isolator, resolve the stage, check the arguments) -> `training_step`
(decide the step's mode and skipped layers from the seed and `state.global_step`; bypass those layers over forward and
backward) -> `compute_loss` (plain, fast or slow forward through the wrapped model) -> `log` (sparse metrics averaged
across processes) -> saving and loading (isolator and skip state saved beside, never inside, the weights).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from . import hub
from .adapters import SparsePlan, get_adapter
from .compressors import get_compressor
from .config import SparseMLLMConfig
from .dualspeed import (
    FAST,
    SLOW,
    STREAM_SELECTION,
    STREAM_SKIP,
    ModeIsolator,
    distillation_kl_sum,
    next_token_targets,
    step_mode,
    step_random,
    token_ce_sum,
)
from .skipping import bypass_layers, get_skip_policy, measure_layer_redundancy

logger = logging.getLogger(__name__)

ISOLATOR_FILE = "sparse_mllm_isolator.safetensors"
SPARSE_STATE_FILE = "sparse_mllm_state.json"
METRIC_KEYS = (
    "skipped_layers",
    "visual_tokens_per_image",
    "seq_len",
    "slow_step",
    "fast_ce",
    "teacher_ce",
    "student_ce",
    "kl",
)


class SparseMLLMTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] that trains vision-language models with compressed visual tokens (fast steps) and,
    in the instruction stage, occasional all-token steps distilled from the fast mode (slow steps, DualSpeed).

    Everything else is the stock `Trainer`: evaluation, prediction and the saved model use all visual tokens, and
    with `token_compressor=None` training is identical to `Trainer`.

    Args:
        sparse_config ([`SparseMLLMConfig`], *optional*):
            The sparse recipe. Defaults to `SparseMLLMConfig()` (DivPrune keeping 25 % of the visual tokens, 10 %
            slow steps in the instruction stage).
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

    # `compute_loss` returns a loss that is already scaled for gradient accumulation on every path, for every
    # architecture (the stock default depends on whether the model accepts loss kwargs).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: TrainingArguments | None = None, *pargs, sparse_config=None, **kwargs):
        if model is None:
            raise ValueError("SparseMLLMTrainer needs `model` (model_init is not supported).")
        if sparse_config is None:
            sparse_config = SparseMLLMConfig()
        if not isinstance(sparse_config, SparseMLLMConfig):
            raise TypeError(f"sparse_config must be a SparseMLLMConfig, got {type(sparse_config).__name__}.")
        self.sparse_config = sparse_config
        self.adapter = get_adapter(model)
        self.compressor = get_compressor(sparse_config.token_compressor) if sparse_config.compression_enabled else None
        self.stage = self._resolve_stage(sparse_config.stage)
        self.num_keep = None
        if self.compressor is not None:
            # Checked now so a bad budget fails before training starts, not at the first step.
            self.num_keep = self.compressor.budget(
                num_tokens=self.adapter.tokens_per_image(),
                keep_ratio=sparse_config.keep_ratio,
                num_keep=sparse_config.num_keep,
                grid_size=self.adapter.grid_size(),
            )
        self.isolator = None
        if self.compressor is not None and sparse_config.num_isolator_tokens > 0:
            self.isolator = getattr(model, "sparse_mllm_isolator", None)
            if self.isolator is None:
                embed = model.get_input_embeddings().weight
                self.isolator = ModeIsolator(
                    sparse_config.num_isolator_tokens,
                    self.adapter.hidden_size(),
                    sparse_config.seed,
                    dtype=embed.dtype,
                ).to(embed.device)
                model.add_module("sparse_mllm_isolator", self.isolator)
        self.skip_policy = None
        if sparse_config.layer_skip_policy is not None:
            sparse_config.check_decoder_depth(len(self.adapter.decoder_layers()))
            self.skip_policy = get_skip_policy(sparse_config.layer_skip_policy)

        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        _check_training_arguments(args, sparse_config, compute_loss_func=kwargs.get("compute_loss_func"))
        # A fast step leaves the isolator or (with vision_feature_layer=-2) vision parameters without gradients.
        if args.ddp_find_unused_parameters is None:
            args = copy.copy(args)
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *pargs, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "SparseMLLMTrainer does not support torch.nn.DataParallel (several GPUs in one process): launch one "
                "process per GPU with `torchrun --nproc_per_node N` or `accelerate launch`."
            )

        self._step_context: dict | None = None
        self._context_step = -1
        self._micro_step = 0
        self._metric_sums = defaultdict(float)
        self._metric_counts = defaultdict(int)
        self._samples_since_log = 0
        self._last_log_time = time.perf_counter()
        self._redundancy: list[float] | None = None  # last measured per-layer input/output similarity
        self._measure_sink: dict = {}
        self._measure_step = -1
        self._skip_counts = [0] * len(self.adapter.decoder_layers())
        self._counted_step = -1
        logger.info(
            "SparseMLLMTrainer: stage=%s compressor=%s keep_ratio=%s slow_mode_prob=%s isolator_tokens=%s "
            "layer_skip_policy=%s",
            self.stage,
            sparse_config.token_compressor,
            sparse_config.num_keep or sparse_config.keep_ratio,
            self.effective_slow_mode_prob,
            sparse_config.num_isolator_tokens if self.isolator is not None else 0,
            sparse_config.layer_skip_policy if self.layer_skipping_active else None,
        )

    def _resolve_stage(self, stage: str) -> str:
        if stage != "auto":
            return stage
        trains_lm = any(p.requires_grad for p in self.adapter.language_model().parameters())
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
        return self.skip_policy is not None and not (self.sparse_config.stage_aware and self.stage == "alignment")

    def step_mode(self, step: int) -> str:
        """The mode (`"fast"` or `"slow"`) of optimizer step `step`: a pure function of the seed and the step."""
        return step_mode(self.sparse_config.seed, step, self.effective_slow_mode_prob)

    def is_measuring_step(self, step: int) -> bool:
        """Full-depth steps on which a measuring policy (`redundancy`) records layer redundancy."""
        return (
            self.layer_skipping_active
            and self.skip_policy.needs_measurement
            and step % self.sparse_config.measure_every == 0
        )

    def skipped_layers(self, step: int, mode: str | None = None) -> tuple[int, ...]:
        """Decoder layers not run on optimizer step `step`: a pure function of the seed, the step and the last
        measured redundancy. Measuring steps, and slow steps (with their teacher) unless `skip_on_slow_steps`, run at
        full depth."""
        mode = self.step_mode(step) if mode is None else mode
        full_depth_slow = mode == SLOW and not self.sparse_config.skip_on_slow_steps
        if not self.layer_skipping_active or full_depth_slow or self.is_measuring_step(step):
            return ()
        config = self.sparse_config
        return self.skip_policy.decide(
            step,
            len(self.adapter.decoder_layers()),
            rng=step_random(config.seed, STREAM_SKIP, step),
            redundancy=self._redundancy,
            skip_ratio=config.skip_ratio,
            max_skip_prob=config.max_skip_prob,
            protect_layers=config.protect_layers,
            skip_layers=config.skip_layers,
        )

    # ---- training ----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.isolator is not None and self.optimizer is not None:
            if not any(p is self.isolator.tokens for group in self.optimizer.param_groups for p in group["params"]):
                raise ValueError(
                    "The optimizer passed to SparseMLLMTrainer does not hold the mode isolator "
                    "(`model.sparse_mllm_isolator.tokens`): build it after creating the trainer, or let the trainer "
                    "create it."
                )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            # Here rather than in `_load_from_checkpoint`, which DeepSpeed runs skip.
            self._load_sparse_state(resume_from_checkpoint)
        self._last_log_time = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.create_model_card()  # the card describes the finished run too (main process only)
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if step != self._context_step:
            self._context_step, self._micro_step = step, 0
        mode = self.step_mode(step)
        skip = self.skipped_layers(step, mode)
        self._step_context = {"step": step, "micro": self._micro_step, "mode": mode, "skip": skip}
        self._samples_since_log += int(inputs["input_ids"].shape[0]) if "input_ids" in inputs else 0
        if self.layer_skipping_active:
            self._record("skipped_layers", len(skip))
            if step != self._counted_step:  # the histogram counts optimizer steps, not micro-batches
                self._counted_step = step
                for layer in skip:
                    self._skip_counts[layer] += 1
        layers = self.adapter.decoder_layers()
        measuring = self.is_measuring_step(step)
        if measuring and step != self._measure_step:  # a new measurement spans the whole accumulation window
            self._measure_step, self._measure_sink = step, {}
        with contextlib.ExitStack() as stack:
            # The bypass spans forward and backward: activation checkpointing replays forwards during backward.
            stack.enter_context(bypass_layers(layers, skip))
            if measuring:
                stack.enter_context(measure_layer_redundancy(layers, self._measure_sink))
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._step_context = None
                self._micro_step += 1
                self._measure_sink.pop("mask", None)
        if measuring:
            self._update_redundancy()
        return loss

    def _update_redundancy(self) -> None:
        """Token-weighted mean similarity over the window so far, summed over processes first, so that every process
        holds the same values and takes the same skip decisions."""
        num_layers = len(self._skip_counts)
        sums = [self._measure_sink.get(i, [0.0, 0])[0] for i in range(num_layers)]
        counts = [self._measure_sink.get(i, [0.0, 0])[1] for i in range(num_layers)]
        stats = torch.tensor(sums + counts, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        values = (stats[:num_layers] / stats[num_layers:].clamp(min=1)).tolist()
        if not all(math.isfinite(v) for v in values):
            logger.warning(
                "Non-finite layer redundancy measured at step %s; keeping the previous one.", self.state.global_step
            )
            return
        self._redundancy = [round(v, 6) for v in values]

    def _note_forward_mask(self, attention_mask) -> None:
        """Let a running redundancy measurement leave the padding of the next forward out."""
        if self._step_context is not None and self._measure_step == self._step_context["step"]:
            self._measure_sink["mask"] = attention_mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.adapter.check_batch(inputs)
        context = self._step_context
        sparse = (
            context is not None
            and self.compressor is not None
            and self.adapter.num_images(inputs) > 0
            and "labels" in inputs
            and not return_outputs
        )
        if not sparse:
            self._note_forward_mask(inputs.get("attention_mask"))
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if context is None:
                return result  # evaluation / prediction: untouched
            loss = result[0] if return_outputs else result
            stock_scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
            if not stock_scaled:
                loss = loss / self._accumulation_steps()
            self._record("slow_step", 0.0)
            if "input_ids" in inputs:
                self._record("seq_len", inputs["input_ids"].shape[1])
            return (loss, result[1]) if return_outputs else loss

        self._check_sparse_batch(inputs)
        if context["mode"] == FAST:
            logits, targets, seq_len = self._answer_logits(model, inputs, compressed=True)
            total = token_ce_sum(logits, targets)
            self._record("fast_ce", total.item() / max(len(targets), 1))
            self._record("visual_tokens_per_image", self.num_keep)
        else:
            with torch.no_grad():
                teacher_logits, teacher_targets, _ = self._answer_logits(model, inputs, compressed=True)
            logits, targets, seq_len = self._answer_logits(model, inputs, compressed=False)
            if not torch.equal(teacher_targets, targets):
                raise RuntimeError("Teacher and student answer tokens differ; the prompts must differ only in images.")
            student_ce = token_ce_sum(logits, targets)
            kl = distillation_kl_sum(logits, teacher_logits, self.sparse_config.distill_temperature)
            total = student_ce + self.sparse_config.distill_weight * kl
            n = max(len(targets), 1)
            self._record("teacher_ce", token_ce_sum(teacher_logits, targets).item() / n)
            self._record("student_ce", student_ce.item() / n)
            self._record("kl", kl.item() / n)
            self._record("visual_tokens_per_image", self.adapter.tokens_per_image())
        self._record("slow_step", float(context["mode"] == SLOW))
        self._record("seq_len", seq_len)
        return self._scale_summed_loss(total, len(targets), num_items_in_batch)

    def _answer_logits(self, model, inputs, compressed: bool):
        """Run the wrapped `model` in fast (compressed) or full mode; return logits and targets at answer positions."""
        plan = SparsePlan()
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        labels = inputs["labels"]
        if compressed:
            k = self.num_keep
            n_iso = self.isolator.tokens.shape[0] if self.isolator is not None else 0
            shrunk = self.adapter.shrink_image_spans(inputs, k + n_iso)
            labels = shrunk.pop("labels")
            batch = shrunk
            plan.compress = self._compress_fn(k)
            plan.needs = self.compressor.requires
            plan.isolator = self.isolator
        targets = next_token_targets(labels)
        plan.logit_positions = targets != -100
        self._note_forward_mask(batch.get("attention_mask"))
        with self.adapter.apply(plan):
            outputs = model(**batch, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        return logits, targets[plan.logit_positions], batch["input_ids"].shape[1]

    def _check_sparse_batch(self, inputs) -> None:
        image = inputs["input_ids"] == self.adapter.image_token_id
        if bool((inputs["labels"][image] != -100).any()):
            raise ValueError(
                "Token compression needs labels of -100 on the image placeholder tokens (they are not predicted; "
                "their number changes on fast steps). Mask them in your collator, as VisionLanguageCollator does."
            )
        if "position_ids" in inputs and inputs.get("attention_mask") is None:
            raise ValueError(
                "Packed (padding-free) batches are not supported with token compression: pass padded batches with "
                "an attention_mask."
            )

    def _compress_fn(self, k: int):
        context = self._step_context
        seed = int(
            step_random(self.sparse_config.seed, STREAM_SELECTION, context["step"], context["micro"]).integers(2**62)
        )

        def compress(features, hook_context):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            return self.compressor.compress(features, k, generator=generator, **hook_context)

        return compress

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
        if self._samples_since_log == 0:  # just logged: the next interval starts now
            self._last_log_time = time.perf_counter()
        else:
            self._last_log_time += time.perf_counter() - start

    def _record(self, name: str, value: float) -> None:
        self._metric_sums[name] += float(value)
        self._metric_counts[name] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.model.training:
            sums = [self._metric_sums[k] for k in METRIC_KEYS] + [self._samples_since_log]
            counts = [self._metric_counts[k] for k in METRIC_KEYS]
            stats = torch.tensor(sums + counts, dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            stats = stats.tolist()
            for i, key in enumerate(METRIC_KEYS):
                count = stats[len(METRIC_KEYS) + 1 + i]
                if count:
                    logs[f"sparse/{key}"] = round(stats[i] / count, 4)
            now = time.perf_counter()
            logs["sparse/samples_per_second"] = round(
                stats[len(METRIC_KEYS)] / max(now - self._last_log_time, 1e-9), 3
            )
            self._last_log_time = now
            self._samples_since_log = 0
            self._metric_sums.clear()
            self._metric_counts.clear()
        if "train_runtime" in logs and self.layer_skipping_active:
            # End of training: how often each decoder layer was skipped.
            steps = max(self.state.global_step, 1)
            for layer, count in enumerate(self._skip_counts):
                logs[f"sparse/skip_frequency/layer_{layer:02d}"] = round(count / steps, 4)
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
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self._save_sparse_state(folder)
        super()._save_checkpoint(model, trial)

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

    def _save_sparse_state(self, folder: str) -> None:
        """Training state that is not model weights: the isolator and the measured layer redundancy."""
        os.makedirs(folder, exist_ok=True)
        if self.isolator is not None:
            tokens = self.isolator.tokens.detach().cpu().contiguous()
            save_file({"tokens": tokens}, os.path.join(folder, ISOLATOR_FILE))
        state = {"layer_redundancy": self._redundancy, "layer_skip_counts": self._skip_counts}
        with open(os.path.join(folder, SPARSE_STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def _load_sparse_state(self, folder: str) -> None:
        state_path = os.path.join(folder, SPARSE_STATE_FILE)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                state = json.load(f)
            self._redundancy = state.get("layer_redundancy")
            self._skip_counts = state.get("layer_skip_counts") or self._skip_counts
        path = os.path.join(folder, ISOLATOR_FILE)
        if self.isolator is not None:
            if not os.path.isfile(path):
                logger.warning(
                    "No %s in %s: the mode isolator restarts from its initial value.", ISOLATOR_FILE, folder
                )
                return
            with torch.no_grad():
                self.isolator.tokens.copy_(load_file(path)["tokens"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        result = None if self.is_fsdp_enabled else _load_checkpoint_weights(model, resume_from_checkpoint)
        if result is not None:
            self._issue_warnings_after_load(result)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            result = _load_checkpoint_weights(self.model, best)
            if result is not None:
                logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
                self._issue_warnings_after_load(result)
                return
        super()._load_best_model()


def _load_checkpoint_weights(model, folder: str):
    """Load a `save_pretrained` folder (one safetensors file or an index of shards) into `model` by module name.

    Returns the `load_state_dict` result, or `None` when the folder has no safetensors weights or its keys are not a
    pure renaming of the model's (the stock loader is used then).
    """
    single, index = os.path.join(folder, SAFE_WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    else:
        return None
    state_dict = {}
    for file in files:
        state_dict.update(load_file(file))
    mapped = _checkpoint_to_module_keys(model, state_dict)
    return None if mapped is None else model.load_state_dict(mapped, strict=False)


def _checkpoint_to_module_keys(model, state_dict: dict) -> dict | None:
    """Rename a checkpoint written by `save_pretrained` back to the model's module names.

    `save_pretrained` writes some architectures (Llava among them) in their legacy key layout, but `Trainer` resumes
    with a plain `load_state_dict`, which then matches no key and silently keeps the current weights. Returns `None`
    when the mapping is not a pure renaming (the stock loader is used then).
    """
    own = model.state_dict()
    module_key = {id(tensor): key for key, tensor in own.items()}
    saved_to_module = {saved: module_key.get(id(t)) for saved, t in revert_weight_conversion(model, dict(own)).items()}
    if None in saved_to_module.values() or not set(state_dict) <= set(saved_to_module):
        return None
    return {saved_to_module[key]: tensor for key, tensor in state_dict.items()}


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

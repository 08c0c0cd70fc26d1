"""Two-process training runs for `tests/test_distributed.py`, started with `torchrun --nproc_per_node 2` (gloo, CPU),
and their one-process references.

A tiny LLaVA trains a few steps with compression, DualSpeed and layer skipping where, on the same optimizer step, one
process's micro-batch is text-only and the other's has images. Each process writes `<name>.json` (per micro-step: the
modules called, in call order; whether the micro-batch had images; the step plan; and the logged metrics) and
`<name>.safetensors` (the trained weights, gathered whole) into the output folder, `<name>` being `rank0`, `rank1` or
`reference`.

    torchrun --nproc_per_node 2 tests/distributed_worker.py ddp OUT            # SparseMLLMTrainer under DDP
    python tests/distributed_worker.py ddp-reference OUT                       # one process, the global batches
    torchrun --nproc_per_node 2 tests/distributed_worker.py fully-shard OUT    # FSDP2 `fully_shard`, no accelerate
    python tests/distributed_worker.py fully-shard-reference OUT
    torchrun --nproc_per_node 2 tests/distributed_worker.py fully-shard-bf16 OUT  # + bf16 + activation checkpointing
    torchrun --nproc_per_node 2 tests/distributed_worker.py deepspeed-zero3 OUT   # needs deepspeed, DS_ACCELERATOR=cpu
    torchrun --nproc_per_node 2 tests/distributed_worker.py plan-mismatch OUT  # process 1 has another seed: must raise
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from conftest import make_sample, tiny_llava, training_args
from safetensors.torch import save_file

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer, dualspeed
from hf_sparse_mllm import trainer as trainer_module
from hf_sparse_mllm.data.collator import VisionLanguageCollator

STEPS = 4
PER_PROCESS_BATCH = 2
# With sequential sampling the data loader deals whole micro-batches to the processes in turn: optimizer step `s`
# gives process 0 samples [4s, 4s + 1] and process 1 samples [4s + 2, 4s + 3]. "T" is a text-only sample, "I" one
# with an image. Steps 0 and 1: process 0 text-only, process 1 images; step 2 the other way round; step 3 mixed.
LAYOUT = "TTIITTIIIITTITII"
# Seed 18 with 30 % slow steps plans fast, slow, fast, slow: both kinds of step meet a text-only process, and the
# stochastic policy skips layers on the fast ones.
SPARSE_CONFIG = dict(
    token_compressor="divprune",
    keep_ratio=0.5,
    slow_mode_prob=0.3,
    seed=18,
    stage="instruction",
    layer_skip_policy="stochastic",
    max_skip_prob=0.6,
    protect_layers=1,
)
# A collective that waits longer than this fails the run instead of hanging the test.
TIMEOUT = timedelta(seconds=90)
CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs"


def dataset(layout: str = LAYOUT) -> list[dict]:
    """Answers of 1 to 3 words, so that the processes train different numbers of tokens on a step: the gradients are
    then those of one process only if every process divides by the token count of the whole step."""
    samples = []
    for i, kind in enumerate(layout):
        sample = make_sample(i, with_image=kind == "I")
        answer = sample["messages"][1]["content"][0]
        answer["text"] = " ".join([answer["text"]] * (1 + i % 3))
        samples.append(sample)
    return samples


class Recorder:
    """Per micro-step: the names of the modules of `model` called (forward pre-hooks, in call order), whether the
    micro-batch had images, the step plan, and the dtypes the distillation loss saw."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[list[str]] = []
        self.had_images: list[bool] = []
        self.plans: list[dict] = []
        self.kl_dtypes: list[dict] = []
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._hook(name or "<root>"))
        original = dualspeed.distillation_kl_sum

        def distillation_kl_sum(student_logits, teacher_logits, temperature):
            kl = original(student_logits, teacher_logits, temperature)
            self.kl_dtypes.append({"logits": str(student_logits.dtype), "kl": str(kl.dtype)})
            return kl

        trainer_module.distillation_kl_sum = distillation_kl_sum

    def _hook(self, name):
        def record(module, args):
            if self.calls:
                self.calls[-1].append(name)

        return record

    def start(self, inputs: dict, plan) -> None:
        self.calls.append([])
        self.had_images.append("pixel_values" in inputs)
        self.plans.append({"step": plan.step, "mode": plan.mode, "skipped": list(plan.skipped_layers)})


class RecordingTrainer(SparseMLLMTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = Recorder(self.model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorder.start(inputs, self.plan_step(self.state.global_step))
        return super().training_step(model, inputs, num_items_in_batch)


def make_trainer(
    out_dir: Path, world_size: int, sparse_overrides=None, layout: str = LAYOUT, **arg_overrides
) -> RecordingTrainer:
    model, processor = tiny_llava(num_hidden_layers=4)
    # Frozen, as in LLaVA-1.5 instruction tuning: sharded engines still gather its parameters on every process.
    model.model.vision_tower.requires_grad_(False)
    args = training_args(
        out_dir,
        max_steps=STEPS,
        # One process takes the global batch of the two: the same samples per optimizer step.
        per_device_train_batch_size=PER_PROCESS_BATCH * 2 // world_size,
        train_sampling_strategy="sequential",
        ddp_backend="gloo" if world_size > 1 else None,
        ddp_timeout=int(TIMEOUT.total_seconds()),
        # SGD: the weights then differ by the learning rate times the gradients' rounding differences. Adam divides
        # each gradient by its running magnitude, which turns rounding noise on near-zero gradients into whole steps.
        optim="sgd",
        learning_rate=0.1,
        **arg_overrides,
    )
    return RecordingTrainer(
        model=model,
        args=args,
        train_dataset=dataset(layout),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=SparseMLLMConfig(**{**SPARSE_CONFIG, **(sparse_overrides or {})}),
    )


# ---- FSDP2 without accelerate ----------------------------------------------------------------------------------


def shard_like_accelerate(model: torch.nn.Module, world_size: int, mixed_precision=None) -> None:
    """`fully_shard` the layer classes `examples/accelerate_configs/fsdp2.yaml` names, then the root, as accelerate's
    FSDP2 `TRANSFORMER_BASED_WRAP` does with that file."""
    from accelerate.commands.config.config_args import load_config_from_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
    wrap = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    kwargs = {
        "mesh": init_device_mesh("cpu", (world_size,)),
        "reshard_after_forward": fsdp["fsdp_reshard_after_forward"],
    }
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for module in list(model.modules())[1:]:
        if type(module).__name__ in wrap:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def train_fully_shard(
    out_dir: Path, world_size: int, rank: int, bf16: bool = False, sparse_overrides=None
) -> RecordingTrainer:
    """Drive `trainer.training_step` over a sharded model by hand (accelerate does not run FSDP on CPU), with the
    global token count `Trainer` would pass, and step a plain AdamW."""
    trainer = make_trainer(out_dir, world_size, sparse_overrides)
    model = trainer.model
    if bf16:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if world_size > 1:
        shard_like_accelerate(model, world_size, torch.bfloat16 if bf16 else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=trainer.args.learning_rate)
    samples = dataset()
    per_step = PER_PROCESS_BATCH * 2
    for step in range(STEPS):
        window = samples[step * per_step : (step + 1) * per_step]
        mine = window if world_size == 1 else window[rank * PER_PROCESS_BATCH : (rank + 1) * PER_PROCESS_BATCH]
        batch, whole = trainer.data_collator(mine), trainer.data_collator(window)
        num_items = (whole["labels"][:, 1:] != -100).sum()  # what Trainer gathers across processes
        trainer.state.global_step = step
        trainer.training_step(model, batch, num_items_in_batch=num_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trainer


# ---- DeepSpeed -------------------------------------------------------------------------------------------------


def train_deepspeed(out_dir: Path, world_size: int, stage: int, checkpointing: bool = False) -> RecordingTrainer:
    """`SparseMLLMTrainer` with the shipped `examples/accelerate_configs/deepspeed_zero<stage>.json`, on DeepSpeed's
    CPU accelerator (`DS_ACCELERATOR=cpu`).

    Without a GPU, accelerate picks no process-group backend for DeepSpeed and runs every process as a world of one
    (each would train on all the data): the state is configured first with gloo, and the trainer told to use it.
    bf16 cannot be tried here: `TrainingArguments(bf16=True)` needs a GPU unless `use_cpu=True`, which turns DeepSpeed
    off, and a config with `"bf16": {"enabled": true}` contradicts `bf16=False`.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=TIMEOUT)
    trainer = make_trainer(
        out_dir,
        world_size,
        deepspeed=str(CONFIGS / f"deepspeed_zero{stage}.json"),
        use_cpu=False,
        accelerator_config={"use_configured_state": True},
        activation_checkpointing=checkpointing,
    )
    trainer.train()
    return trainer


# ---- output ----------------------------------------------------------------------------------------------------


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every process (FSDP2 DTensors and ZeRO-3 partitions gathered)."""
    params = dict(model.named_parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()))
    with gathered:
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for name, p in params.items()
        }


def write(out_dir: Path, name: str, trainer: RecordingTrainer, world_size: int, weights=None) -> None:
    recorder = trainer.recorder
    record = {
        "world_size": world_size,
        "calls": recorder.calls,
        "had_images": recorder.had_images,
        "plans": recorder.plans,
        "kl_dtypes": recorder.kl_dtypes,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        # What a checkpoint saves of the isolator: gathered on every process (a collective when sharded).
        "isolator": trainer._gathered_isolator().tolist() if trainer.isolator is not None else None,
    }
    Path(out_dir, f"{name}.json").write_text(json.dumps(record))
    save_file(
        weights if weights is not None else full_weights(trainer.model), str(Path(out_dir, f"{name}.safetensors"))
    )


def main(scenario: str, out_dir: str) -> None:
    out = Path(out_dir)
    torch.use_deterministic_algorithms(True)
    distributed = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = f"rank{rank}" if distributed else "reference"
    if scenario in ("ddp", "ddp-reference"):
        trainer = make_trainer(out, world_size)
        trainer.train()
    elif scenario in ("ddp-images", "ddp-images-reference"):
        trainer = make_trainer(out, world_size, layout="I" * len(LAYOUT))
        trainer.train()
    elif scenario in ("fully-shard", "fully-shard-reference", "fully-shard-bf16"):
        trainer = train_fully_shard(out, world_size, rank, bf16=scenario == "fully-shard-bf16")
    elif scenario == "fully-shard-skipping-only":
        # No token compression: the trainer takes the stock forward (layer skipping still on).
        trainer = train_fully_shard(out, world_size, rank, sparse_overrides={"token_compressor": None})
    elif scenario.startswith("deepspeed-zero"):
        stage = int(scenario[len("deepspeed-zero")])
        trainer = train_deepspeed(out, world_size, stage, checkpointing=scenario.endswith("-checkpointing"))
    elif scenario == "plan-mismatch":
        # Process 1 starts with another recipe seed, whose step 0 is slow: both processes must stop with an error.
        trainer = make_trainer(out, world_size, sparse_overrides={"seed": 3 if rank else 18}, layout="I" * len(LAYOUT))
        trainer.train()
    else:
        raise ValueError(
            "scenario must be one of ddp, ddp-reference, ddp-images, ddp-images-reference, fully-shard, "
            "fully-shard-reference, fully-shard-bf16, fully-shard-skipping-only, deepspeed-zero2, "
            f"deepspeed-zero2-checkpointing, deepspeed-zero3, plan-mismatch; got {scenario!r}"
        )
    write(out, name, trainer, world_size)
    if distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

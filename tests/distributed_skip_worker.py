"""Run under `torchrun --nproc_per_node 2`: trains a few steps and records every sparse decision per process."""

import json
import sys

import torch.distributed as dist
from conftest import make_dataset, tiny_llava, training_args

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.data.collator import VisionLanguageCollator


class Recorder(SparseMLLMTrainer):
    decisions = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self.decisions.append({"step": step, "mode": self.step_mode(step), "skip": list(self.skipped_layers(step))})
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir):
    from pathlib import Path

    model, processor = tiny_llava(num_hidden_layers=6)
    config = SparseMLLMConfig(
        token_compressor="divprune",
        keep_ratio=0.5,
        slow_mode_prob=0.3,
        stage="instruction",
        layer_skip_policy="redundancy",
        skip_ratio=0.34,
        measure_every=2,
    )
    args = training_args(Path(out_dir), max_steps=6, per_device_train_batch_size=2, ddp_backend="gloo")
    trainer = Recorder(
        model=model,
        args=args,
        train_dataset=make_dataset(24),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=config,
    )
    trainer.train()
    rank = dist.get_rank()
    record = {
        "world_size": dist.get_world_size(),
        "decisions": trainer.decisions,
        "redundancy": trainer.layer_skipper.redundancy,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])

"""Train 6 steps saving every 2 (save_total_limit=1); with `--kill-at N`, SIGKILL this process while checkpoint-N is
being written (its stock files are on disk, the sparse state that completes it is not); with `--resume`, resume
from the newest complete checkpoint. Writes the final parameters to `<dir>/params.pt`."""

import os
import signal
import sys
from pathlib import Path

import torch
from conftest import make_dataset, tiny_llava, training_args

from hf_sparse_mllm import SparseMLLMConfig, SparseMLLMTrainer
from hf_sparse_mllm.data.collator import VisionLanguageCollator


class KillWhileSaving(SparseMLLMTrainer):
    kill_at = None

    def _save_sparse_state(self, folder, isolator=None):
        if self.state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_sparse_state(folder, isolator)


def main(root: str, *flags: str) -> None:
    root = Path(root)
    model, processor = tiny_llava(num_hidden_layers=4)
    recipe = SparseMLLMConfig(
        token_compressor="random", keep_ratio=0.5, slow_mode_prob=0.5, stage="instruction",
        layer_skip_policy="redundancy", skip_ratio=0.34, measure_every=2,
    )  # fmt: skip
    args = training_args(root, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = KillWhileSaving(
        model=model,
        args=args,
        train_dataset=make_dataset(24),
        data_collator=VisionLanguageCollator(processor),
        sparse_config=recipe,
    )
    if "--kill-at" in flags:
        KillWhileSaving.kill_at = int(flags[flags.index("--kill-at") + 1])
    trainer.train(resume_from_checkpoint=True if "--resume" in flags else None)
    torch.save({n: p.detach() for n, p in model.named_parameters()}, root / "params.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

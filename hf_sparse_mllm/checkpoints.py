"""Checkpoints that are complete or not taken, and the sparse training state they carry.

A checkpoint folder is complete when it holds `sparse_mllm_state.json` with `"complete": true`: the trainer writes
that file last, atomically, after every process has written its part of the stock checkpoint. A kill at any earlier
point leaves a folder without it, which `resume_from_checkpoint=True` passes over (saying so).
"""

from __future__ import annotations

import json
import os
import re
import tempfile

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STATE_FILE = "sparse_mllm_state.json"
ISOLATOR_FILE = "sparse_mllm_isolator.safetensors"
# Fields whose change on resume changes neither a decision nor the loss.
UNCHECKED_ON_RESUME = frozenset({"sparse_mllm_version", "max_nonfinite_steps", "resume_note"})
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def atomic_write(path: str, write) -> None:
    """Write a file through `write(temporary_path)` and rename it into place: readers see all of it or nothing."""
    folder = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_state(folder: str, state: dict) -> None:
    """Write the sparse training state of a checkpoint, marking it complete (the last file a checkpoint gets)."""

    def dump(path):
        with open(path, "w") as f:
            json.dump({**state, "complete": True}, f, indent=2)

    atomic_write(os.path.join(folder, STATE_FILE), dump)


def read_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_complete(folder: str) -> bool:
    state = read_state(folder)
    return bool(state and state.get("complete")) and os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))


def checkpoints_by_step(output_dir: str) -> dict[int, str]:
    """Every `checkpoint-N` folder of `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return {}
    found = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found[int(match.group(1))] = os.path.join(output_dir, name)
    return found


def recipe_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Fields of the recipe that differ between a checkpoint and the current run, as `{field: (saved, current)}`."""
    fields = (set(saved) | set(current)) - UNCHECKED_ON_RESUME
    return {
        name: (saved.get(name), current.get(name)) for name in sorted(fields) if saved.get(name) != current.get(name)
    }

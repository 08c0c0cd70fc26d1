"""Workarounds for `transformers`, and the list of its private parts this package relies on.

`SparseMLLMTrainer` overrides these `Trainer` internals (tested by the trainer tests on every supported version):
`_save`, `_save_checkpoint`, `_load_from_checkpoint`, `_load_best_model`, `_push_from_checkpoint`,
`_maybe_log_save_evaluate`, `_get_output_dir`, `_issue_warnings_after_load`, `get_tp_size`,
`current_gradient_accumulation_steps` and `model_accepts_loss_kwargs`; it reads
`transformers.core_model_loading.revert_weight_conversion` below.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def load_checkpoint_weights(model, folder: str):
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
    mapped = checkpoint_to_module_keys(model, state_dict)
    return None if mapped is None else model.load_state_dict(mapped, strict=False)


def checkpoint_to_module_keys(model, state_dict: dict) -> dict | None:
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

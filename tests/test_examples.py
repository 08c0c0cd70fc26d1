"""The runnable examples: each trains a tiny offline model for a few steps with `--tiny` and saves a sparse export."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["sft_vlm_sparse", "trainer_sparse"])
def test_example_trains_a_tiny_model(name, tmp_path):
    from hf_sparse_mllm import SparseSFTTrainer

    argv = ["--tiny", "--output_dir", str(tmp_path), "--max_steps", "2", "--logging_steps", "1", "--save_strategy",
            "no", "--keep_ratio", "0.5", "--layer_skip_policy", "fixed", "--skip_layers", "1", "--protect_layers", "0"]  # fmt: skip
    trainer = load_example(name).main(argv)
    assert isinstance(trainer, SparseSFTTrainer) == (name == "sft_vlm_sparse")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(entry["sparse/visual_tokens_per_image"] == 8 and entry["sparse/skipped_layers"] == 1 for entry in logs)
    recipe = json.loads((tmp_path / "sparse_mllm_config.json").read_text())
    assert recipe["keep_ratio"] == 0.5 and recipe["seed"] == trainer.args.seed
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "README.md").exists()


def test_docstrings_hold_copy_pasteable_commands():
    for name in ("sft_vlm_sparse", "trainer_sparse"):
        doc = load_example(name).__doc__
        assert f"python examples/{name}.py --tiny --output_dir" in doc, name


def test_readme_quickstart_runs_and_its_export_loads_without_the_package(tmp_path, monkeypatch):
    """The README's quickstart block, as a user copies it: it trains, saves, and reloads with plain transformers."""
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "LlavaForConditionalGeneration"
    saved = json.loads((tmp_path / "llava-sparse" / "sparse_mllm_config.json").read_text())
    assert saved["token_compressor"] == "divprune" and saved["keep_ratio"] == 0.25
    assert namespace["trainer"].state.global_step == 20

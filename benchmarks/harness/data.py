"""The generated VQA data of a harness run, built once and cached on disk (memory-mapped by every later run)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from hf_sparse_mllm.data.vqa import build_vqa_dataset, load_vqa_dataset, save_vqa_dataset

from .presets import DemoConfig

logger = logging.getLogger(__name__)


def dataset_name(config: DemoConfig) -> str:
    """The cache folder name of `config`'s data: every argument the data depends on.

    ```python
    >>> from benchmarks.harness.data import dataset_name
    >>> from benchmarks.harness.presets import DEMO_PRESETS
    >>> dataset_name(DEMO_PRESETS["default"])
    'vqa-128px-cell16-train20000-test1000-seed0-obj5-border1'

    ```
    """
    return (
        f"vqa-{config.model.image_size}px-cell{config.cell_size}-train{config.train_samples}"
        f"-test{config.test_samples}-seed{config.seed}-obj{config.max_objects}-border{config.border}"
        + ("-imagefirst" if config.image_first else "")
        + ("-" + "-".join(config.families) if config.families else "")
    )


def prepare_data(config: DemoConfig, cache_dir: str | os.PathLike | None = "outputs/data", progress: bool = False):
    """Generate the VQA dataset for `config` (or load it from `cache_dir`, where it is saved after generation).

    Returns a `DatasetDict` with `train` and `test` splits; with a `cache_dir` it is read from
    `cache_dir/<dataset_name(config)>`.
    """
    path = Path(cache_dir) / dataset_name(config) if cache_dir is not None else None
    if path is not None and (path / "dataset_dict.json").is_file():
        logger.info("Loading the cached dataset from %s", path)
        return load_vqa_dataset(str(path))
    dataset = build_vqa_dataset(
        num_train=config.train_samples,
        num_test=config.test_samples,
        seed=config.seed,
        image_size=config.model.image_size,
        cell_size=config.cell_size,
        families=config.families,
        max_objects=config.max_objects,
        border=config.border,
        image_first=config.image_first,
        progress=progress,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a concurrent run never memory-maps a half-written (or rewritten) cache.
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        save_vqa_dataset(dataset, str(partial))
        try:
            os.rename(partial, path)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(partial, ignore_errors=True)
        dataset = load_vqa_dataset(str(path))  # memory-mapped, as every later run reads it
    return dataset

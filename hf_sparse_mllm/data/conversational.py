"""Datasets in the training format (TRL's conversational `images` + `messages`), from local files or the Hub.

The command line trains and evaluates on the same format, read the same way:

- [`load_conversational_dataset`] reads one split of a `save_to_disk` folder, a JSON/JSONL/parquet/CSV file or a
  folder of them, or a Hub dataset id (through `datasets`);
- [`simple_to_conversational`] turns simple `image` / `question` / `answer` columns into that format (one user turn
  with the image and the question, one assistant turn with the answer);
- [`resolve_image_paths`] reads image columns that hold file paths relative to the data file, as `datasets`'
  `imagefolder` metadata files do, checks that every file exists and casts the column to `datasets.Image`.
"""

from __future__ import annotations

import os
from typing import Any

CONVERSATIONAL = "conversational"
SIMPLE = "simple"
DATASET_FORMATS = (CONVERSATIONAL, SIMPLE)

# How many missing image files an error lists before it says "and N more".
_MISSING_SHOWN = 5


def dataset_root(path: str | os.PathLike | None) -> str | None:
    """The folder that relative image paths of the dataset at `path` are read from: the folder of a data file, a
    dataset folder itself, and `None` for a Hub id (its paths stay relative to the working directory)."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return os.path.abspath(path) if os.path.isdir(path) else None


def simple_to_conversational(
    dataset, image_column: str = "image", question_column: str = "question", answer_column: str = "answer"
):
    """Turn a dataset with one image, a question and an answer per row into TRL's conversational format.

    Each row becomes `{"images": [image], "messages": [user turn: the image, then the question; assistant turn: the
    answer]}` (`images` is empty where the image is missing). The three columns are replaced; others are kept.

    Args:
        dataset (`datasets.Dataset`):
            The rows.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images (file paths, `datasets` images or `None`).
        question_column (`str`, *optional*, defaults to `"question"`):
            Column of the question texts.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column of the answer texts.

    Returns:
        `datasets.Dataset`: with `images` and `messages` columns.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_sparse_mllm.data.conversational import simple_to_conversational
    >>> rows = Dataset.from_list([{"image": "cat.png", "question": "what animal ?", "answer": "cat"}])
    >>> sample = simple_to_conversational(rows)[0]
    >>> sample["images"], [m["role"] for m in sample["messages"]], sample["messages"][1]["content"][0]["text"]
    (['cat.png'], ['user', 'assistant'], 'cat')

    ```
    """
    columns = {"image_column": image_column, "question_column": question_column, "answer_column": answer_column}
    missing = {flag: name for flag, name in columns.items() if name not in dataset.column_names}
    if missing:
        raise ValueError(
            f"The simple dataset format needs the columns {list(columns.values())}; missing "
            + ", ".join(f"{name!r} ({flag})" for flag, name in missing.items())
            + f". The dataset's columns are {dataset.column_names}."
        )
    clash = [name for name in ("images", "messages") if name in dataset.column_names and name not in columns.values()]
    if clash:
        raise ValueError(f"The dataset already has {clash} columns; it is in the conversational format already?")

    def convert(row: dict) -> dict:
        image = row[image_column]
        user = ([{"type": "image", "text": None}] if image is not None else []) + [
            {"type": "text", "text": str(row[question_column])}
        ]
        return {
            "images": [image] if image is not None else [],
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": str(row[answer_column])}]},
            ],
        }

    return dataset.map(convert, remove_columns=list(dict.fromkeys(columns.values())), desc="simple -> conversational")


def _string_paths(feature) -> tuple[bool, bool]:
    """(holds file paths as strings, is a list of them) for an image column's `datasets` feature."""
    from datasets import LargeList, List, Value

    is_list = isinstance(feature, List | LargeList)
    inner = feature.feature if is_list else feature
    return isinstance(inner, Value) and inner.dtype in ("string", "large_string"), is_list


def _resolve(path: str | None, root: str | None) -> str | None:
    if path is None or root is None or "://" in path or os.path.isabs(path):
        return path
    return os.path.join(root, os.path.expanduser(path))


def resolve_image_paths(dataset, root: str | None):
    """Read the `images` (or `image`) column's file paths relative to `root`, check the files exist, and cast the
    column to `datasets.Image` so that samples carry decoded images, as a Hub dataset's do.

    Columns that already hold images (an `Image` feature: `save_to_disk` folders, parquet files and Hub datasets
    written with images) are left as they are. Absolute paths and URLs are kept; with `root=None` relative paths stay
    relative to the working directory.

    Args:
        dataset (`datasets.Dataset`):
            Samples whose `images` column holds lists of paths (or whose `image` column holds one path).
        root (`str`, *optional*):
            The folder relative paths start from (see [`dataset_root`]).

    Returns:
        `datasets.Dataset`: the samples, the column cast to `List(Image())` (or `Image()`).

    Raises:
        `FileNotFoundError`: naming the rows and the paths of missing files (before anything is trained).

    Example:

    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from PIL import Image
    >>> from hf_sparse_mllm.data.conversational import resolve_image_paths
    >>> folder = tempfile.mkdtemp()
    >>> Image.new("RGB", (8, 8), "red").save(f"{folder}/red.png")
    >>> dataset = resolve_image_paths(Dataset.from_dict({"images": [["red.png"]], "messages": [[]]}), folder)
    >>> dataset[0]["images"][0].size
    (8, 8)
    >>> resolve_image_paths(Dataset.from_dict({"images": [["red.png", "blue.png"]], "messages": [[]]}), folder)
    Traceback (most recent call last):
    ...
    FileNotFoundError: 1 image file of the dataset does not exist (paths relative to ...): row 0: .../blue.png

    ```
    """
    from datasets import Image, List

    column = next((name for name in ("images", "image") if name in dataset.column_names), None)
    if column is None:
        return dataset
    is_paths, is_list = _string_paths(dataset.features[column])
    if not is_paths:
        return dataset
    rows: list[Any] = dataset[column]
    if is_list:
        resolved = [[_resolve(path, root) for path in (paths or [])] for paths in rows]
    else:
        resolved = [_resolve(path, root) for path in rows]
    missing = [
        (row, path)
        for row, paths in enumerate(resolved)
        for path in (paths if is_list else [paths])
        if path is not None and "://" not in path and not os.path.isfile(path)
    ]
    if missing:
        shown = "; ".join(f"row {row}: {path}" for row, path in missing[:_MISSING_SHOWN])
        more = f"; and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        where = f"relative to {root}" if root is not None else "relative to the working directory"
        raise FileNotFoundError(
            f"{len(missing)} image file{'s' if len(missing) != 1 else ''} of the dataset "
            f"{'do' if len(missing) != 1 else 'does'} not exist (paths {where}): {shown}{more}"
        )
    feature = List(Image()) if is_list else Image()
    return dataset.remove_columns(column).add_column(column, resolved).cast_column(column, feature)


def load_conversational_dataset(
    path: str,
    split: str = "train",
    *,
    dataset_config: str | None = None,
    dataset_format: str = CONVERSATIONAL,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
):
    """Load one split of a dataset in the training format, with its images readable.

    Args:
        path (`str`):
            A `save_to_disk` folder, a JSON/JSONL/parquet/CSV file, a folder of such files, or a Hub dataset id.
        split (`str`, *optional*, defaults to `"train"`):
            The split (a single-split dataset, such as one data file, is used whatever its split is called).
        dataset_config (`str`, *optional*):
            Hub configuration name.
        dataset_format (`str`, *optional*, defaults to `"conversational"`):
            `"conversational"` (`images` + `messages` columns) or `"simple"` (`image`, `question` and `answer`
            columns, converted with [`simple_to_conversational`]).
        image_column, question_column, answer_column (`str`, *optional*):
            The simple format's column names.

    Returns:
        `datasets.Dataset`: samples with `messages` and, where the data has images, `images`.
    """
    from ..evaluation.tasks import load_docs

    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format must be one of {list(DATASET_FORMATS)}, got {dataset_format!r}.")
    dataset = load_docs(path, split=split, dataset_name=dataset_config)
    if dataset_format == SIMPLE:
        dataset = simple_to_conversational(dataset, image_column, question_column, answer_column)
    elif "messages" not in dataset.column_names:
        hint = ""
        if {image_column, question_column, answer_column} <= set(dataset.column_names):
            hint = (
                f" It has {image_column!r}/{question_column!r}/{answer_column!r} columns: use dataset_format='simple'."
            )
        raise ValueError(
            f"The dataset at {path} has no 'messages' column (columns: {dataset.column_names}); the conversational "
            f"format needs 'messages' (and 'images').{hint}"
        )
    return resolve_image_paths(dataset, dataset_root(path))


__all__ = [
    "CONVERSATIONAL",
    "DATASET_FORMATS",
    "SIMPLE",
    "dataset_root",
    "load_conversational_dataset",
    "resolve_image_paths",
    "simple_to_conversational",
]

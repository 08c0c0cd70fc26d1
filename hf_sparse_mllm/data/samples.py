"""Samples that know their dataset index, images loaded where an error can name them, and the error for a bad sample.

A `DataLoader` worker reads a sample (`dataset[i]`, where a `datasets` `Image` feature decodes its images) and then
collates a batch; an exception in either place says nothing about which sample failed. [`index_samples`] makes every
sample carry its dataset index under [`SAMPLE_INDEX_KEY`] and moves reading errors into the collator:

- a `datasets.Dataset` stays one (so TRL's `SFTTrainer` accepts it): an index column is added and its `Image`
  features are cast to `decode=False`, so images are decoded by [`load_image`] inside the collator;
- any other map-style dataset (a list, a `torch.utils.data.Dataset`) is wrapped in [`IndexedDataset`], which also
  turns an exception raised by the dataset's own `__getitem__` into a marked sample.

[`~hf_sparse_mllm.data.collator.VisionLanguageCollator`] then raises a [`BadSampleError`] naming the index (and the
image path or column) of every bad sample, or drops them with `skip_bad_samples=True`.

`Trainer` drops dataset columns the model's forward does not take unless `remove_unused_columns=False` (needed for
conversational samples anyway); [`~hf_sparse_mllm.SparseSFTTrainer`] adds the index column to the columns TRL keeps.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import PIL.Image
import torch
from transformers.image_utils import load_image as _transformers_load_image

SAMPLE_INDEX_KEY = "sparse_sample_index"
"""The key (and `datasets` column) under which [`index_samples`] stores each sample's dataset index."""

SAMPLE_ERROR_KEY = "sparse_sample_error"
"""The key under which [`IndexedDataset`] reports an exception raised while reading a sample."""


@dataclass(frozen=True)
class BadSample:
    """One sample that cannot be collated: its dataset index (`None` when unknown), its batch position and why."""

    index: int | None
    position: int
    reason: str

    def __str__(self) -> str:
        where = f"dataset index {self.index}" if self.index is not None else f"batch position {self.position}"
        return f"{where}: {self.reason}"


class BadSampleError(ValueError):
    """Raised for samples that cannot be collated; `samples` lists them as [`BadSample`]s.

    The message comes first so that a `DataLoader` worker can re-raise it in the main process (as
    `BadSampleError(message)`, without `samples`).

    Example:

    ```python
    >>> from hf_sparse_mllm.data.samples import BadSample, BadSampleError
    >>> error = BadSampleError.from_samples([BadSample(7, 0, "images[0]: file not found: a.png")])
    >>> error.indices
    [7]
    >>> print(error)
    1 bad sample in the batch:
      - dataset index 7: images[0]: file not found: a.png
    ```
    """

    def __init__(self, message: str, samples: list[BadSample] | tuple[BadSample, ...] = ()):
        super().__init__(message)
        self.samples = list(samples)

    @classmethod
    def from_samples(cls, samples: list[BadSample], hint: str = "") -> BadSampleError:
        lines = "\n".join(f"  - {sample}" for sample in samples)
        message = f"{len(samples)} bad sample{'s' if len(samples) != 1 else ''} in the batch:\n{lines}"
        if any(sample.index is None for sample in samples):
            message += (
                "\nThe dataset indices are unknown: wrap the dataset with hf_sparse_mllm.data.samples.index_samples "
                "(and train with remove_unused_columns=False) for the errors to name them."
            )
        return cls(f"{message}\n{hint}" if hint else message, samples)

    @property
    def indices(self) -> list[int | None]:
        return [sample.index for sample in self.samples]


class IndexedDataset(torch.utils.data.Dataset):
    """
    A map-style dataset whose samples are `dict`s carrying their index under [`SAMPLE_INDEX_KEY`].

    An exception raised while reading a sample (a failing `__getitem__` of the wrapped dataset) does not stop the
    `DataLoader`: the sample comes back as `{SAMPLE_INDEX_KEY: index, SAMPLE_ERROR_KEY: "<error>"}`, which
    [`~hf_sparse_mllm.data.collator.VisionLanguageCollator`] reports (or skips) by its index. Use
    [`index_samples`], which keeps a `datasets.Dataset` a `datasets.Dataset`.

    Args:
        dataset (`Sequence[dict]` or `torch.utils.data.Dataset`):
            Any map-style dataset of `dict` samples (`len(dataset)` and `dataset[i]`).

    Example:

    ```python
    >>> from hf_sparse_mllm.data.samples import IndexedDataset
    >>> class Flaky(list):
    ...     def __getitem__(self, index):
    ...         if index == 1:
    ...             raise OSError("disk error")
    ...         return super().__getitem__(index)
    >>> dataset = IndexedDataset(Flaky([{"messages": []}, {"messages": []}]))
    >>> dataset[0], dataset[1]
    ({'messages': [], 'sparse_sample_index': 0}, {'sparse_sample_index': 1, 'sparse_sample_error': 'OSError: disk error'})
    ```
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            sample = self.dataset[index]
        except Exception as error:  # any reading failure: the collator knows whether to raise or skip
            return {SAMPLE_INDEX_KEY: index, SAMPLE_ERROR_KEY: f"{type(error).__name__}: {error}"}
        if not isinstance(sample, dict):
            return {SAMPLE_INDEX_KEY: index, SAMPLE_ERROR_KEY: f"the sample is a {type(sample).__name__}, not a dict"}
        return {**sample, SAMPLE_INDEX_KEY: index}


def index_samples(dataset):
    """
    Make every sample of `dataset` carry its dataset index, and read its images in the collator, so that
    [`~hf_sparse_mllm.data.collator.VisionLanguageCollator`] names the index of a bad sample.

    Args:
        dataset (`datasets.Dataset`, `Sequence[dict]` or `torch.utils.data.Dataset`):
            The training samples. A `datasets.Dataset` gets a `"sparse_sample_index"` column (cheap: existing
            columns are not rewritten, unless the dataset has an indices mapping from `select`/`shuffle`, which is
            flattened) and its `Image` features are cast to `decode=False` (free for a top-level `Image` column; a
            column of lists of images is cast with `Dataset.cast`, which rewrites the table once). The collator then
            decodes them the way `datasets` does (a `mode` set on the `Image` feature is not applied: image
            processors convert to RGB themselves). Errors inside a `set_transform` function are not covered. Any
            other map-style dataset is wrapped in [`IndexedDataset`].

    Returns:
        A `datasets.Dataset`, or an [`IndexedDataset`].

    Example:

    ```python
    >>> from datasets import Dataset, Image, List
    >>> from hf_sparse_mllm.data.samples import index_samples
    >>> dataset = Dataset.from_dict({"images": [["a.png"]], "messages": [[]]}).cast_column("images", List(Image()))
    >>> indexed = index_samples(dataset)
    >>> indexed[0]
    {'images': [{'bytes': None, 'path': 'a.png'}], 'messages': [], 'sparse_sample_index': 0}
    >>> index_samples([{"messages": []}])[0]
    {'messages': [], 'sparse_sample_index': 0}
    ```
    """
    datasets = sys.modules.get("datasets")  # a `datasets` object exists only if the package is already imported
    if datasets is not None and isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            "index_samples needs a map-style dataset (a stream has no stable index); for a streaming "
            "datasets.IterableDataset use `dataset.decode(False)` so the collator decodes the images and its errors "
            "name the samples' batch positions."
        )
    if datasets is None or not isinstance(dataset, datasets.Dataset):
        return IndexedDataset(dataset)
    if SAMPLE_INDEX_KEY in dataset.column_names:
        raise ValueError(f"The dataset already has a {SAMPLE_INDEX_KEY!r} column; index_samples was applied twice?")
    for column, feature in dataset.features.items():
        undecoded = _without_image_decoding(feature, datasets)
        if undecoded is not None:
            dataset = dataset.cast_column(column, undecoded)
    return dataset.add_column(SAMPLE_INDEX_KEY, list(range(len(dataset))))


def _without_image_decoding(feature, datasets):
    """`feature` with every `Image` inside it set to `decode=False`, or `None` if it holds no decoded `Image`."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False) if feature.decode else None
    if isinstance(feature, datasets.LargeList | datasets.List):
        inner = _without_image_decoding(feature.feature, datasets)
        if inner is None:
            return None
        return (
            datasets.LargeList(inner)
            if isinstance(feature, datasets.LargeList)
            else datasets.List(inner, feature.length)
        )
    return None


def load_image(image: Any) -> PIL.Image.Image:
    """
    Return `image` as a PIL image, with errors that say what is wrong.

    Accepts a PIL image (returned as is), a local path, an `http(s)://` URL or a base64 string (loaded like
    `transformers.image_utils.load_image` does, as TRL's collator would), raw bytes, or the `{"bytes", "path"}` dict
    of a `datasets` `Image(decode=False)` feature (decoded like `datasets` does). A path that does not exist raises
    `FileNotFoundError("file not found: <path>")` (`transformers` would report it as an invalid base64 string).

    Example:

    ```python
    >>> from hf_sparse_mllm.data.samples import load_image
    >>> load_image("does/not/exist.png")
    Traceback (most recent call last):
    ...
    FileNotFoundError: file not found: does/not/exist.png
    ```
    """
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, dict) and set(image) == {"bytes", "path"}:
        if image["bytes"] is None and image["path"] is not None and "://" not in image["path"]:
            _check_file(image["path"])
        import datasets  # the dict comes from a `datasets` feature, so the package is there

        return datasets.Image().decode_example(image)
    if isinstance(image, bytes | bytearray):
        decoded = PIL.Image.open(BytesIO(image))
        decoded.load()
        return decoded
    if isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        if path.startswith(("http://", "https://", "data:image/")) or os.path.isfile(path):
            return _transformers_load_image(path)
        try:  # a raw base64 string; anything that does not decode to an image was meant as a path
            return _transformers_load_image(_as_base64_image(path))
        except (binascii.Error, ValueError, OSError):
            raise FileNotFoundError(f"file not found: {path}") from None
    raise TypeError(
        f"Unsupported image of type {type(image).__name__}; expected a PIL image, a path, a URL, a base64 string, "
        'bytes, or a datasets Image(decode=False) dict {"bytes": ..., "path": ...}.'
    )


def _as_base64_image(text: str) -> str:
    data = base64.b64decode(text, validate=True)
    PIL.Image.open(BytesIO(data))  # raises UnidentifiedImageError (an OSError) if it is not an image
    return text


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")


def describe_image(image: Any) -> str:
    """A short name for an image in an error message: its path where it has one."""
    if isinstance(image, str | os.PathLike):
        text = os.fspath(image)
        return repr(text if len(text) <= 200 else text[:200] + "...")
    if isinstance(image, dict) and image.get("path"):
        return repr(image["path"])
    if isinstance(image, bytes | bytearray) or isinstance(image, dict) and image.get("bytes") is not None:
        return "image bytes"
    return type(image).__name__


__all__ = [
    "SAMPLE_ERROR_KEY",
    "SAMPLE_INDEX_KEY",
    "BadSample",
    "BadSampleError",
    "IndexedDataset",
    "describe_image",
    "index_samples",
    "load_image",
]

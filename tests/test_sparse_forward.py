"""The sequence shortening of the sparse forward: every per-token tensor follows, padding side kept."""

import torch

from hf_sparse_mllm.adapters import PlaceholderRun, VisualLayout
from hf_sparse_mllm.sparse_forward import shorten_runs

IMG, P = 9, 0  # image token id, pad id


def _layout(input_ids):
    """One run per maximal span of image tokens (the default layout)."""
    runs = []
    for row, ids in enumerate(input_ids.tolist()):
        start = None
        for i, token in enumerate([*ids, None]):
            if token == IMG and start is None:
                start = i
            elif token != IMG and start is not None:
                runs.append(PlaceholderRun(row, start, i - start, len(runs)))
                start = None
    return VisualLayout(runs, [])


def test_shorten_keeps_text_and_repads_left():
    # row 0: one image, left padded; row 1: two images
    input_ids = torch.tensor(
        [[P, P, P, P, P, 1, IMG, IMG, IMG, IMG, 2, 3], [1, IMG, IMG, IMG, IMG, 2, IMG, IMG, IMG, IMG, 3, 4]]
    )
    mask = (input_ids != P).long()
    labels = torch.where(input_ids == IMG, -100, input_ids).masked_fill(mask == 0, -100)
    token_types = (input_ids == IMG).long()
    inputs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "mm_token_type_ids": token_types,
        "pixel_values": torch.zeros(3, 1),
    }
    layout = _layout(input_ids)
    out, index_map, slots = shorten_runs(inputs, layout, [2, 2, 2], pad_token_id=P)
    assert out["input_ids"].tolist() == [[P, P, P, 1, IMG, IMG, 2, 3], [1, IMG, IMG, 2, IMG, IMG, 3, 4]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
    assert out["labels"].tolist() == [[-100, -100, -100, 1, -100, -100, 2, 3], [1, -100, -100, 2, -100, -100, 3, 4]]
    assert out["mm_token_type_ids"].tolist() == (out["input_ids"] == IMG).long().tolist()
    assert out["pixel_values"] is not None and out["pixel_values"].shape == (3, 1)
    # Text tokens map back to their own positions; image slots to their run (refined by the selection later).
    assert index_map[0].tolist() == [2, 3, 4, 5, 6, 6, 10, 11]  # its own padding stays (mapped back to itself)
    assert slots == [(0, 4), (1, 1), (1, 4)]


def test_image_inputs_shaped_like_the_tokens_are_not_gathered():
    """Two images of 12 patches beside two rows of 12 tokens (Gemma 4's `(images, patches, ...)` inputs): only the
    per-token tensors are shortened, not the adapter's `visual_inputs`."""
    input_ids = torch.tensor(
        [[1, IMG, IMG, IMG, IMG, 2, 3, 4, 5, 6, 7, 8], [1, IMG, IMG, IMG, IMG, 2, 3, 4, 5, 6, 7, 8]]
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": (input_ids == IMG).long(),
        "pixel_values": torch.randn(2, 12, 48),
        "image_position_ids": torch.arange(24).view(2, 12, 1).expand(2, 12, 2),
    }
    visual = ("pixel_values", "image_position_ids")
    out, _, _ = shorten_runs(inputs, _layout(input_ids), [2, 2], pad_token_id=P, visual_inputs=visual)
    assert out["input_ids"].shape == out["token_type_ids"].shape == (2, 10)
    assert out["pixel_values"] is inputs["pixel_values"] and out["image_position_ids"] is inputs["image_position_ids"]


def test_shorten_repads_rows_with_different_image_counts_on_the_right():
    input_ids = torch.tensor(
        [[1, IMG, IMG, IMG, IMG, 2, P, P, P, P, P], [1, IMG, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, 2]]
    )
    mask = (input_ids != P).long()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": torch.zeros_like(input_ids)}
    out, _, _ = shorten_runs(inputs, _layout(input_ids), [5, 5, 5], pad_token_id=P)
    assert out["input_ids"].tolist() == [
        [1, IMG, IMG, IMG, IMG, IMG, 2, P, P, P, P, P, P],
        [1, IMG, IMG, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, IMG, 2],
    ]
    assert out["position_ids"][1].tolist() == list(range(13))


def test_runs_of_different_lengths_shrink_to_their_own_budgets():
    input_ids = torch.tensor([[1, IMG, IMG, IMG, IMG, IMG, IMG, 2, IMG, IMG, 3]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    out, _, _ = shorten_runs(inputs, _layout(input_ids), [3, 1], pad_token_id=P)
    assert out["input_ids"].tolist() == [[1, IMG, IMG, IMG, 2, IMG, 3]]

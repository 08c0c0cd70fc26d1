"""The image-span rebuild used by the sparse forward."""

import pytest
import torch

from hf_sparse_mllm.adapters import shrink_image_spans

IMG, P = 9, 0  # image token id, pad id


def test_shrink_keeps_text_and_repads_left():
    # row 0: one image, left padded; row 1: two images
    input_ids = torch.tensor(
        [[P, P, P, P, P, 1, IMG, IMG, IMG, IMG, 2, 3], [1, IMG, IMG, IMG, IMG, 2, IMG, IMG, IMG, IMG, 3, 4]]
    )
    mask = (input_ids != P).long()
    labels = torch.where(input_ids == IMG, -100, input_ids).masked_fill(mask == 0, -100)
    out = shrink_image_spans(
        {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.zeros(3, 1)},
        image_token_id=IMG,
        tokens_per_image=4,
        new_tokens_per_image=2,
        pad_token_id=P,
    )
    assert out["input_ids"].tolist() == [[P, P, P, 1, IMG, IMG, 2, 3], [1, IMG, IMG, 2, IMG, IMG, 3, 4]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
    assert out["labels"].tolist() == [[-100, -100, -100, 1, -100, -100, 2, 3], [1, -100, -100, 2, -100, -100, 3, 4]]
    assert out["pixel_values"] is not None and out["pixel_values"].shape == (3, 1)


def test_shrink_repads_rows_with_different_image_counts_on_the_right():
    input_ids = torch.tensor(
        [[1, IMG, IMG, IMG, IMG, 2, P, P, P, P, P], [1, IMG, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, 2]]
    )
    mask = (input_ids != P).long()
    out = shrink_image_spans(
        {"input_ids": input_ids, "attention_mask": mask, "position_ids": torch.zeros_like(input_ids)},
        image_token_id=IMG,
        tokens_per_image=4,
        new_tokens_per_image=5,
        pad_token_id=P,
    )
    assert out["input_ids"].tolist() == [
        [1, IMG, IMG, IMG, IMG, IMG, 2, P, P, P, P, P, P],
        [1, IMG, IMG, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, IMG, 2],
    ]
    assert out["position_ids"][1].tolist() == list(range(13))


def test_shrink_rejects_partial_image_span():
    input_ids = torch.tensor([[1, IMG, IMG, IMG, 2]])
    with pytest.raises(ValueError, match="not a multiple"):
        shrink_image_spans(
            {"input_ids": input_ids}, image_token_id=IMG, tokens_per_image=4, new_tokens_per_image=2, pad_token_id=P
        )

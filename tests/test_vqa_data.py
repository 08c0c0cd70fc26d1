"""The generated CLEVR-like VQA dataset: determinism, correct answers (by an independent solver and by the pixels),
disjoint splits, balanced families and answers, a near-chance blind baseline and a lossless disk round trip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hf_sparse_mllm.data.vqa import (
    BACKGROUND,
    BORDER,
    FAMILIES,
    PALETTE,
    Scene,
    answer_question,
    blind_baseline,
    build_vqa_dataset,
    load_vqa_dataset,
    question_family,
    render_scene,
    sample_scene,
    save_vqa_dataset,
    vqa_vocabulary,
)

# The LLaVA-1.5 chat template: images first, then the text of each turn.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def vqa():
    # Large enough for stable balance and blind-baseline estimates, still about 2 s to build on 2 cores.
    return build_vqa_dataset(num_train=2000, num_test=300, seed=0)


def raw_image_bytes(split) -> list[bytes]:
    from datasets import Image, List

    return [images[0]["bytes"] for images in split.cast_column("images", List(Image(decode=False)))["images"]]


def test_same_seed_same_data_and_pixels_different_seed_different_data():
    first, second = (build_vqa_dataset(num_train=40, num_test=20, seed=3) for _ in range(2))
    other = build_vqa_dataset(num_train=40, num_test=20, seed=4)
    for split in ("train", "test"):
        for column in ("question", "answer", "family", "scene", "messages"):
            assert first[split][column] == second[split][column]
        assert raw_image_bytes(first[split]) == raw_image_bytes(second[split])
        assert first[split]["scene"] != other[split]["scene"]
        assert raw_image_bytes(first[split]) != raw_image_bytes(other[split])


def test_every_answer_matches_the_independent_solver(vqa):
    for split in ("train", "test"):
        for row in vqa[split].select(range(300)).remove_columns("images"):
            assert question_family(row["question"]) == row["family"]
            assert answer_question(Scene.from_json(row["scene"]), row["question"]) == row["answer"]
            # The question comes before the image by default (image_first=False).
            assert [c["type"] for c in row["messages"][0]["content"]] == ["text", "image"]
            assert row["messages"][0]["content"][0]["text"] == row["question"]
            assert row["messages"][1]["content"][0]["text"] == row["answer"]


def test_color_answers_match_the_rendered_pixels(vqa):
    colour_rows = vqa["train"].filter(lambda family: family == "color", input_columns="family").select(range(100))
    for row in colour_rows:
        pixels = np.asarray(row["images"][0].convert("RGB"))
        shape = row["question"].split()[-2]
        ((_, _, r, c),) = [o for o in Scene.from_json(row["scene"]).objects if o[0] == shape]
        cell = pixels[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].reshape(-1, 3)
        # The cell holds the answer's colour (painted without anti-aliasing), the black border and background.
        assert {tuple(p) for p in cell} == {PALETTE[row["answer"]], BORDER, BACKGROUND}
        # The corner of the cell is margin, and so background.
        assert tuple(pixels[r * 16, c * 16]) == BACKGROUND


@pytest.mark.parametrize("border", [0, 1])
def test_shapes_are_filled_with_or_without_a_black_border(border):
    scene = Scene(objects=[("square", "red", 0, 0), ("circle", "blue", 0, 1), ("triangle", "green", 1, 0)])
    pixels = np.asarray(render_scene(scene, image_size=32, cell_size=16, border=border))
    borders = {}
    for shape, color, r, c in scene.objects:
        cell = pixels[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
        assert tuple(cell[10, 8]) == PALETTE[color]  # inside every shape
        borders[shape] = np.all(cell == BORDER, axis=-1)
        assert borders[shape].any() == bool(border)
    # The borders of a circle and a square share no pixel, so the two shapes differ by colour-free pixels.
    assert not (borders["circle"] & borders["square"]).any()
    with pytest.raises(ValueError, match="border must be >= 0"):
        render_scene(scene, image_size=32, cell_size=16, border=-1)


def test_images_have_the_requested_size_and_are_mostly_background():
    for image_size, cell_size in ((192, 16), (96, 16), (192, 32)):
        ds = build_vqa_dataset(num_train=10, num_test=0, seed=0, image_size=image_size, cell_size=cell_size)
        for row in ds["train"]:
            image = row["images"][0]
            assert image.size == (image_size, image_size) and image.mode == "RGB"
            pixels = np.asarray(image)
            background = np.all(pixels == BACKGROUND, axis=-1).mean()
            scene = Scene.from_json(row["scene"])
            # Each object stays inside its own cell: at most one cell of paint per object.
            assert background >= 1 - len(scene.objects) * cell_size**2 / image_size**2
            if image_size == 192 and cell_size == 16:
                assert background > 0.8


def test_train_and_test_are_disjoint_and_test_is_fixed_by_the_seed(vqa):
    assert not set(vqa["train"]["scene"]) & set(vqa["test"]["scene"])
    # The test split does not depend on the size of the training split.
    other = build_vqa_dataset(num_train=5, num_test=300, seed=0)["test"].remove_columns("images")
    assert other.to_dict() == vqa["test"].remove_columns("images").to_dict()


def test_families_are_balanced_and_weights_respected(vqa):
    counts = Counter(vqa["train"]["family"])
    assert set(counts) == set(FAMILIES) and set(counts.values()) == {400}
    weighted = build_vqa_dataset(num_train=90, num_test=0, families={"color": 2, "exist": 1})
    assert Counter(weighted["train"]["family"]) == {"color": 60, "exist": 30}
    with pytest.raises(ValueError, match="Unknown question families"):
        build_vqa_dataset(num_train=1, num_test=0, families=["colour"])


@pytest.mark.parametrize("family", ["exist", "relation"])
def test_yes_no_answers_are_balanced(vqa, family):
    answers = [a for a, f in zip(vqa["train"]["answer"], vqa["train"]["family"]) if f == family]
    assert set(answers) == {"yes", "no"}
    assert 0.4 < answers.count("yes") / len(answers) < 0.6  # fair coins: 400 answers, 4 sigma


def test_count_answers_are_balanced(vqa):
    answers = Counter(a for a, f in zip(vqa["train"]["answer"], vqa["train"]["family"]) if f == "count")
    assert set(answers) == {"0", "1", "2", "3"} and min(answers.values()) > 0.2 * sum(answers.values())


def test_blind_baseline_is_near_chance(vqa):
    blind = blind_baseline(vqa["train"], vqa["test"])
    assert set(blind) == {"overall", *FAMILIES}
    assert blind["color"] < 0.35
    assert blind["shape"] < 0.5
    assert 0.35 < blind["exist"] < 0.65 and 0.35 < blind["relation"] < 0.65
    assert blind["overall"] < 0.5


def test_messages_and_images_round_trip_through_disk(vqa, tmp_path):
    small = build_vqa_dataset(num_train=20, num_test=10, seed=1)
    save_vqa_dataset(small, tmp_path / "vqa")
    loaded = load_vqa_dataset(tmp_path / "vqa")
    for split in ("train", "test"):
        assert loaded[split].features == small[split].features
        assert loaded[split]["messages"] == small[split]["messages"]
        assert raw_image_bytes(loaded[split]) == raw_image_bytes(small[split])
    assert loaded["train"][0]["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": small["train"][0]["question"]}, {"type": "image", "text": None}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": small["train"][0]["answer"]}]},
    ]


def test_stored_messages_render_with_a_chat_template():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<image>", "USER:", "ASSISTANT:", *vqa_vocabulary()]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    row = build_vqa_dataset(num_train=1, num_test=0, seed=0, image_first=True)["train"][0]
    assert [c["type"] for c in row["messages"][0]["content"]] == ["image", "text"]
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert text == f"USER: <image>\n{row['question']} ASSISTANT: {row['answer']} "
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_docstring_example_runs():
    import doctest

    from hf_sparse_mllm.data import vqa

    assert doctest.testmod(vqa).failed == 0


def test_vocabulary_covers_every_question_and_answer(vqa):
    vocabulary = set(vqa_vocabulary())
    words = {w for q in vqa["train"]["question"] for w in q.split()} | set(vqa["train"]["answer"])
    assert words <= vocabulary


def test_several_questions_per_image_share_the_image_and_differ():
    ds = build_vqa_dataset(num_train=30, num_test=0, seed=0, questions_per_image=3)["train"]
    scenes, questions, images = ds["scene"], ds["question"], raw_image_bytes(ds)
    for start in range(0, 30, 3):
        assert len(set(scenes[start : start + 3])) == 1 and len(set(images[start : start + 3])) == 1
        assert len(set(questions[start : start + 3])) == 3


@pytest.mark.parametrize("questions_per_image", [2, 3, 5])
def test_questions_of_one_image_come_from_distinct_families(questions_per_image):
    # Two count questions about one image can be unsatisfiable together (two colours 3 times with 5 objects at most).
    n = 30 * questions_per_image + 1  # the last image gets the remainder
    rows = build_vqa_dataset(num_train=n, num_test=0, seed=1, image_size=64, questions_per_image=questions_per_image)
    rows = rows["train"]
    images, families = raw_image_bytes(rows), rows["family"]
    groups = [families[start : start + questions_per_image] for start in range(0, n, questions_per_image)]
    for start, group in zip(range(0, n, questions_per_image), groups):
        assert len(set(images[start : start + questions_per_image])) == 1
        assert len(set(group)) == len(group)
    assert [len(g) for g in groups] == [questions_per_image] * 30 + [1]
    assert sorted(Counter(families).values()) == [n // 5] * 4 + [n // 5 + 1]
    if questions_per_image == 2:  # families are paired at random: every pair occurs
        assert {tuple(sorted(g)) for g in groups[:-1]} == {(a, b) for a in FAMILIES for b in FAMILIES if a < b}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(families=["count"], questions_per_image=2),  # two counts per image: targets fit in 5 objects together
        dict(questions_per_image=6),  # more questions than families: one family repeats per image
        dict(max_objects=2, families=["count", "color"]),  # count answers above max_objects are never drawn
        dict(families={"color": 3.0, "exist": 1.0}, questions_per_image=2),  # colour must repeat on half the images
    ],
)
def test_constrained_question_mixes_generate_and_stay_correct(kwargs):
    rows = build_vqa_dataset(num_train=48, num_test=0, seed=2, image_size=64, **kwargs)["train"]
    assert rows.num_rows == 48
    for row in rows:
        assert answer_question(Scene.from_json(row["scene"]), row["question"]) == row["answer"]
    if "max_objects" in kwargs:
        assert max(int(a) for a, f in zip(rows["answer"], rows["family"]) if f == "count") <= 2


def test_solver_rejects_ambiguous_questions_and_renderer_checks_the_grid():
    scene = Scene(objects=[("circle", "red", 0, 0), ("circle", "blue", 0, 3), ("square", "red", 1, 5)])
    assert answer_question(scene, "what color is the square ?") == "red"
    assert answer_question(scene, "how many red objects are there ?") == "2"
    assert answer_question(scene, "is the blue circle left of the red square ?") == "yes"
    assert answer_question(scene, "is there an orange triangle ?") == "no"
    with pytest.raises(ValueError, match="not exactly one"):
        answer_question(scene, "what color is the circle ?")
    with pytest.raises(ValueError, match="multiple of cell_size"):
        render_scene(scene, image_size=100, cell_size=16)
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene(objects=[("circle", "red", 0, 0), ("square", "red", 0, 0)])
    assert sample_scene(np.random.default_rng(0), grid_size=2, max_objects=4).objects

"""A generated CLEVR-like visual question answering dataset, deterministic by seed and built offline.

Scenes are 1-5 flat shapes (circle, square, triangle in six colours) on a plain grey canvas. Every object is drawn
inside one patch-aligned cell of a regular grid, because a tiny model learns patch-aligned objects at least one patch
wide in minutes on a CPU, and free-placed ones not at all (measured with a 0.74M-parameter LLaVA). At the default
192 px canvas with 16 px cells, 144 visual tokens carry at most 5 objects: most tokens are background, which is the
redundancy that visual token compression removes.

Two defaults exist for a model trained from scratch, both measured. Shapes are filled with their colour and drawn with
a 1 px black border (`border=1`): with plain fills a patch embedding sees colour x shape as one product (a circle
covers 78 % of the square around it), and a tiny model stays at chance on shape questions for thousands of steps,
while the black border is a colour-independent shape signature that a linear layer can read. The question comes
before the image in the user turn (`image_first=False`): with causal attention the image tokens then see the question,
so each can tell whether it is the object asked about.

Each sample is one image and one question with a one-word answer, tagged with a question family:

| family | question | answer |
|---|---|---|
| `color` | what color is the <shape> ? (the shape is unique in the scene) | a colour |
| `shape` | what shape is the <color> object ? (the colour is unique in the scene) | a shape |
| `exist` | is there a <color> <shape> ? | yes / no, balanced |
| `count` | how many <color> objects are there ? | "0" .. "3", balanced (one count question per image) |
| `relation` | is the <color> <shape> left of the <color> <shape> ? (both unique, different columns) | yes / no, balanced |

Answers are balanced within each family so a question-only model stays near chance (see [`blind_baseline`]).
The train and test splits come from different seed streams and are disjoint by construction: a stable hash of the
scene description assigns every possible scene to exactly one split.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours far from each other and from the grey background; drawn without anti-aliasing, so every object
# pixel has exactly its palette value.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
BORDER: tuple[int, int, int] = (0, 0, 0)
FAMILIES: tuple[str, ...] = ("color", "shape", "exist", "count", "relation")
YES, NO = "yes", "no"
# Count questions target 0..3 uniformly (a colour appears 4 or 5 times too rarely to balance); digits, not words.
COUNT_TARGETS: tuple[int, ...] = (0, 1, 2, 3)
COUNT_WORDS: tuple[str, ...] = tuple(str(i) for i in range(6))

# One scene in `_TEST_BUCKETS` (by a stable hash of its description) may appear in the test split, all others in train.
_TEST_BUCKETS = 8
# Scene resampling per image before giving up: only reachable with contradictory requests (e.g. many count questions).
_MAX_SCENE_TRIES = 10_000


@dataclass
class Scene:
    """The description of one image: which shape of which colour sits in which grid cell.

    Args:
        objects (`list[tuple[str, str, int, int]]`, *optional*, defaults to `[]`):
            `(shape, color, row, col)` per object, at most one object per cell. Kept sorted by `(row, col)` so two
            scenes with the same objects compare (and hash) equal.
    """

    objects: list[tuple[str, str, int, int]] = field(default_factory=list)

    def __post_init__(self):
        self.objects = sorted(((str(s), str(c), int(r), int(q)) for s, c, r, q in self.objects), key=lambda o: o[2:])
        cells = [o[2:] for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Two objects share a grid cell in {self.objects}; use one object per cell.")
        for shape, color, _, _ in self.objects:
            if shape not in SHAPES or color not in PALETTE:
                raise ValueError(f"Unknown object ({shape!r}, {color!r}); shapes are {SHAPES}, colours {COLORS}.")

    def to_json(self) -> str:
        return json.dumps({"objects": [list(o) for o in self.objects]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls(objects=[tuple(o) for o in json.loads(text)["objects"]])


def sample_scene(rng: np.random.Generator, grid_size: int = 12, min_objects: int = 1, max_objects: int = 5) -> Scene:
    """Draw a scene: a uniform number of objects in distinct uniform cells, shapes and colours uniform and independent.

    Args:
        rng (`np.random.Generator`): the random stream; the scene is a pure function of its state.
        grid_size (`int`, *optional*, defaults to `12`): cells per side (`image_size // cell_size`).
        min_objects (`int`, *optional*, defaults to `1`): fewest objects.
        max_objects (`int`, *optional*, defaults to `5`): most objects.
    """
    if not 1 <= min_objects <= max_objects <= grid_size * grid_size:
        raise ValueError(
            f"Need 1 <= min_objects <= max_objects <= grid_size**2, got min_objects={min_objects}, "
            f"max_objects={max_objects}, grid_size={grid_size}."
        )
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(grid_size * grid_size, size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    colors = rng.integers(0, len(COLORS), size=n)
    return Scene(
        objects=[
            (SHAPES[s], COLORS[c], int(cell) // grid_size, int(cell) % grid_size)
            for s, c, cell in zip(shapes, colors, cells)
        ]
    )


def render_scene(scene: Scene, image_size: int = 192, cell_size: int = 16, border: int = 1) -> Image.Image:
    """Draw `scene` on a grey RGB canvas: each object a filled shape inside its `cell_size` cell, clear of its edges.

    Args:
        scene ([`Scene`]): what to draw.
        image_size (`int`, *optional*, defaults to `192`): canvas side in pixels, a multiple of `cell_size`.
        cell_size (`int`, *optional*, defaults to `16`): cell side in pixels; use a multiple of the vision patch size
            so every object covers whole patches.
        border (`int`, *optional*, defaults to `1`): width of the black border around each shape; `0` draws plain
            fills. With a border, circles are drawn `cell_size // 8` pixels smaller than squares, so that their borders
            share no pixel while `border` is at most that inset.
    """
    if border < 0:
        raise ValueError(f"border must be >= 0 (0 draws plain fills), got {border}.")
    grid_size = _grid_size(image_size, cell_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Objects nearly fill their cell (big enough to learn) but leave a gap so neighbours stay separate.
    margin = max(1, cell_size // 16)
    inset = cell_size // 8 if border else 0
    for shape, color, row, col in scene.objects:
        if not (0 <= row < grid_size and 0 <= col < grid_size):
            raise ValueError(f"Object at cell ({row}, {col}) is outside the {grid_size}x{grid_size} grid.")
        x0, y0 = col * cell_size + margin, row * cell_size + margin
        x1, y1 = (col + 1) * cell_size - 1 - margin, (row + 1) * cell_size - 1 - margin
        paint = {"fill": PALETTE[color], "outline": BORDER, "width": border} if border else {"fill": PALETTE[color]}
        if shape == "circle":
            draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), **paint)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), **paint)
        else:
            draw.polygon([(col * cell_size + cell_size // 2, y0), (x0, y1), (x1, y1)], **paint)
    return image


# --------------------------------------------------------------------------------------------------------------------
# Question generation


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(candidates: Sequence, rng: np.random.Generator):
    """One of `candidates` drawn by `rng`, or `None` (drawing nothing) when there are none."""
    return candidates[rng.integers(len(candidates))] if candidates else None


def _make_question(family: str, scene: Scene, rng: np.random.Generator, count_target: int) -> tuple[str, str] | None:
    """One `(question, answer)` of `family` about `scene`, or `None` when the scene cannot host that family."""
    objects = scene.objects
    shape_counts = Counter(o[0] for o in objects)
    color_counts = Counter(o[1] for o in objects)
    if family == "color":
        # Objects are (shape, color, row, col): ask the color of an object that alone has its shape, and the shape
        # of one that alone has its color.
        picked = _pick([o for o in objects if shape_counts[o[0]] == 1], rng)
        return None if picked is None else (f"what color is the {picked[0]} ?", picked[1])
    if family == "shape":
        picked = _pick([o for o in objects if color_counts[o[1]] == 1], rng)
        return None if picked is None else (f"what shape is the {picked[1]} object ?", picked[0])
    if family == "exist":
        present = {(o[1], o[0]) for o in objects}
        if rng.random() < 0.5:
            color, shape = _pick(sorted(present), rng)
            answer = YES
        else:
            color, shape = _pick([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present], rng)
            answer = NO
        return f"is there {_article(color)} {color} {shape} ?", answer
    if family == "count":
        color = _pick([c for c in COLORS if color_counts[c] == count_target], rng)
        return None if color is None else (f"how many {color} objects are there ?", str(count_target))
    if family == "relation":
        combo_counts = Counter((o[0], o[1]) for o in objects)
        unique = [o for o in objects if combo_counts[(o[0], o[1])] == 1]
        pair = _pick([(a, b) for i, a in enumerate(unique) for b in unique[i + 1 :] if a[3] != b[3]], rng)
        if pair is None:
            return None
        a, b = pair
        # The pair is unordered; ordering it to match a fair coin balances yes/no exactly for every question text.
        want_yes = rng.random() < 0.5
        if (a[3] < b[3]) != want_yes:
            a, b = b, a
        answer = YES if a[3] < b[3] else NO
        return f"is the {a[1]} {a[0]} left of the {b[1]} {b[0]} ?", answer
    raise ValueError(f"Unknown question family {family!r}; choose from {FAMILIES}.")


def _family_weights(families: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    if families is None:
        families = FAMILIES
    weights = dict(families) if isinstance(families, Mapping) else dict.fromkeys(families, 1.0)
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise ValueError(f"Unknown question families {unknown}; choose from {list(FAMILIES)}.")
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"families needs at least one family with a positive weight, got {families!r}.")
    return {f: float(w) for f, w in weights.items() if w > 0}


def _family_schedule(
    weights: dict[str, float], n: int, rng: np.random.Generator, group_size: int = 1
) -> list[list[str]]:
    """Exactly `round(weight share * n)` questions per family (largest remainder), in random groups of `group_size`
    (one group per image, the last one holding the remainder). Repeats of a family within a group are avoided where
    possible, best effort: a bounded number of random swaps with other groups."""
    names = list(weights)
    shares = np.array([weights[f] for f in names]) / sum(weights.values()) * n
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if group_size == 1:
        schedule = [f for f, c in zip(names, counts) for _ in range(c)]
        return [[schedule[i]] for i in rng.permutation(n)]
    sizes = np.full(-(-n // group_size), group_size)
    if n % group_size:
        sizes[-1] = n % group_size
    filled = np.zeros_like(sizes)
    groups: list[list[str]] = [[] for _ in sizes]
    # Each family goes to distinct groups drawn at random, the emptiest groups likelier, most frequent family first,
    # so that families are spread without repeats whenever the weights allow.
    for i in np.argsort(-counts, kind="stable"):
        remaining = int(counts[i])
        while remaining:
            room = sizes - filled
            open_groups = np.flatnonzero(room > 0)
            chosen = rng.choice(
                open_groups, size=min(remaining, len(open_groups)), replace=False, p=room[open_groups] / room.sum()
            )
            for g in chosen:
                groups[g].append(names[i])
            filled[chosen] += 1
            remaining -= len(chosen)
    _swap_out_repeats(groups, rng)
    return [[group[j] for j in rng.permutation(len(group))] for group in groups]


def _swap_out_repeats(groups: list[list[str]], rng: np.random.Generator, probes: int = 64) -> None:
    """Where the greedy fill left a family twice in a group, swap one copy with another group's family (in place)."""
    for group in groups:
        for family in sorted({f for f in group if group.count(f) > 1}):
            for b in rng.integers(len(groups), size=probes):
                if group.count(family) == 1:
                    break
                other = groups[b]
                swap = next((f for f in other if f not in group), None) if family not in other else None
                if swap is not None:
                    group[group.index(family)], other[other.index(swap)] = swap, family


def _count_targets(families: list[str], rng: np.random.Generator, max_objects: int) -> list[int]:
    """Answers of the image's count questions, drawn before the scene (so that rejection sampling cannot skew them
    towards 0 or 1) and jointly possible: no target above `max_objects`, and together at most `max_objects`. With
    several count questions on one image, that joint limit makes large answers rarer (e.g. two per image: "3" 20 %)."""
    allowed = [t for t in COUNT_TARGETS if t <= max_objects]
    while True:
        targets = [int(rng.choice(allowed)) if f == "count" else 0 for f in families]
        if sum(targets) <= max_objects:
            return targets


def _scene_bucket(scene: Scene) -> int:
    # A stable hash (Python's `hash` is salted per process) so the split of a scene never changes.
    return int.from_bytes(hashlib.blake2b(scene.to_json().encode(), digest_size=8).digest(), "little") % _TEST_BUCKETS


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: the canvases are flat and small, and this is most of the generation time.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _grid_size(image_size: int, cell_size: int) -> int:
    if cell_size <= 0 or image_size <= 0 or image_size % cell_size:
        raise ValueError(
            f"image_size must be a positive multiple of cell_size, got image_size={image_size}, cell_size={cell_size}."
        )
    return image_size // cell_size


def _messages(question: str, answer: str, image_first: bool) -> list[dict]:
    # Every content item carries both keys, because that is the schema `datasets` stores and returns.
    content = [{"type": "image", "text": None}, {"type": "text", "text": question}]
    return [
        {"role": "user", "content": content if image_first else content[::-1]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _generate_split(
    num_samples: int,
    rng: np.random.Generator,
    test_split: bool,
    image_size: int,
    cell_size: int,
    weights: dict[str, float],
    questions_per_image: int,
    max_objects: int,
    border: int,
    image_first: bool,
    progress: bool = False,
) -> dict[str, list]:
    from tqdm.auto import tqdm

    grid_size = _grid_size(image_size, cell_size)
    schedule = _family_schedule(weights, num_samples, rng, questions_per_image)
    columns: dict[str, list] = {k: [] for k in ("images", "messages", "question", "answer", "family", "scene")}
    split = "test" if test_split else "train"
    for families in tqdm(schedule, desc=f"Drawing {split} scenes", unit="image", disable=not progress):
        targets = _count_targets(families, rng, max_objects)
        for _ in range(_MAX_SCENE_TRIES):
            scene = sample_scene(rng, grid_size=grid_size, max_objects=max_objects)
            if (_scene_bucket(scene) == 0) != test_split:
                continue
            qas = [_make_question(f, scene, rng, t) for f, t in zip(families, targets)]
            questions = [qa[0] for qa in qas if qa is not None]
            if len(questions) == len(families) and len(set(questions)) == len(questions):
                break
        else:
            raise RuntimeError(
                f"Found no scene for the question families {families} in {_MAX_SCENE_TRIES} tries; "
                "lower questions_per_image or change the family weights."
            )
        image = {"bytes": _png_bytes(render_scene(scene, image_size, cell_size, border)), "path": None}
        scene_json = scene.to_json()
        for family, (question, answer) in zip(families, qas):
            columns["images"].append([image])
            columns["messages"].append(_messages(question, answer, image_first))
            columns["question"].append(question)
            columns["answer"].append(answer)
            columns["family"].append(family)
            columns["scene"].append(scene_json)
    return columns


def vqa_features():
    """The `datasets.Features` of every split built by [`build_vqa_dataset`]."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "images": List(Image()),
            "messages": List(
                {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
            ),
            "question": Value("string"),
            "answer": Value("string"),
            "family": Value("string"),
            "scene": Value("string"),
        }
    )


def build_vqa_dataset(
    num_train: int = 20_000,
    num_test: int = 1_000,
    seed: int = 0,
    image_size: int = 192,
    cell_size: int = 16,
    families: Sequence[str] | Mapping[str, float] | None = None,
    questions_per_image: int = 1,
    max_objects: int = 5,
    border: int = 1,
    image_first: bool = False,
    progress: bool = False,
):
    """Generate the synthetic VQA dataset as a `datasets.DatasetDict` with `train` and `test` splits.

    Columns: `images` (a list holding one PIL image), `messages` (TRL conversational format: a user turn with the
    question and an image item, an assistant turn with the answer; every content item has the keys `type` and
    `text`, `text` is `None` for the image item), `question`, `answer`, `family` and `scene` (the JSON of the
    [`Scene`], for [`answer_question`] and analysis). The result is a pure function of the arguments; the test split
    does not depend on `num_train`, so one seed gives one fixed test set.

    Args:
        num_train (`int`, *optional*, defaults to `20000`): number of training samples (question-answer pairs).
        num_test (`int`, *optional*, defaults to `1000`): number of test samples.
        seed (`int`, *optional*, defaults to `0`): seed of both splits (spawned into independent streams).
        image_size (`int`, *optional*, defaults to `192`): canvas side in pixels.
        cell_size (`int`, *optional*, defaults to `16`): grid cell side in pixels; a multiple of the vision patch size.
        families (`Sequence[str]` or `Mapping[str, float]`, *optional*, defaults to all five with equal weight):
            the question families to generate, or a mapping from family to relative weight. Each family gets exactly
            its share of the samples (rounded).
        questions_per_image (`int`, *optional*, defaults to `1`): distinct questions asked about each image, of
            distinct families where the family weights allow; each question is one row, the image is repeated. When
            the number of samples is not a multiple, the last image gets the remainder.
        max_objects (`int`, *optional*, defaults to `5`): most objects per scene (at least 1).
        border (`int`, *optional*, defaults to `1`): width of the black border around each shape; `0` for none.
        image_first (`bool`, *optional*, defaults to `False`): put the image before the question in the user turn
            (LLaVA's usual order) instead of after it.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar per split.

    Example:

    ```python
    >>> from hf_sparse_mllm.data.vqa import answer_question, build_vqa_dataset
    >>> ds = build_vqa_dataset(num_train=50, num_test=10, seed=0)
    >>> ds["train"].num_rows, ds["test"].num_rows
    (50, 10)
    >>> sample = ds["train"][0]
    >>> sample["images"][0].size
    (192, 192)
    >>> sample["messages"][0]["content"][1]
    {'type': 'image', 'text': None}
    >>> from hf_sparse_mllm.data.vqa import Scene
    >>> answer_question(Scene.from_json(sample["scene"]), sample["question"]) == sample["answer"]
    True

    ```
    """
    from datasets import Dataset, DatasetDict

    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train} and {num_test}.")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}.")
    weights = _family_weights(families)
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
    features = vqa_features()
    splits = {}
    for name, n, seq in (("train", num_train, train_seq), ("test", num_test, test_seq)):
        columns = _generate_split(
            n, np.random.default_rng(seq), name == "test", image_size, cell_size, weights, questions_per_image,
            max_objects, border, image_first, progress,
        )  # fmt: skip
        splits[name] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def save_vqa_dataset(dataset, path: str) -> None:
    """Cache a dataset built by [`build_vqa_dataset`] with `save_to_disk` (images stored as PNG bytes)."""
    dataset.save_to_disk(str(path))


def load_vqa_dataset(path: str):
    """Load a dataset saved by [`save_vqa_dataset`] (`load_from_disk`), with the same columns and values."""
    from datasets import load_from_disk

    return load_from_disk(str(path))


def vqa_vocabulary() -> list[str]:
    """Every whitespace-separated word that can appear in a question or an answer, sorted, for a word-level tokenizer."""
    words = {"what", "color", "is", "the", "shape", "object", "there", "a", "an", "how", "many", "objects", "are"}
    words |= {"left", "of", "?", YES, NO}
    words |= set(SHAPES) | set(COLORS) | set(COUNT_WORDS)
    return sorted(words)


# --------------------------------------------------------------------------------------------------------------------
# Independent checks: a question parser/solver and a question-only baseline


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_PATTERNS = {
    "color": re.compile(rf"^what color is the ({_SHAPE_RE}) \?$"),
    "shape": re.compile(rf"^what shape is the ({_COLOR_RE}) object \?$"),
    "exist": re.compile(rf"^is there an? ({_COLOR_RE}) ({_SHAPE_RE}) \?$"),
    "count": re.compile(rf"^how many ({_COLOR_RE}) objects are there \?$"),
    "relation": re.compile(rf"^is the ({_COLOR_RE}) ({_SHAPE_RE}) left of the ({_COLOR_RE}) ({_SHAPE_RE}) \?$"),
}


def question_family(question: str) -> str:
    """The family of a question text, parsed from the text alone."""
    for family, pattern in _PATTERNS.items():
        if pattern.match(question.strip()):
            return family
    raise ValueError(f"Not a question of this dataset: {question!r}.")


def answer_question(scene: Scene, question: str) -> str:
    """Answer `question` from the scene description alone, by parsing the text (no shared code with generation).

    Raises a `ValueError` when the question is ambiguous or unanswerable for `scene` (a referenced object is missing
    or not unique), which the generator must never produce.
    """

    def the(shape: str | None = None, color: str | None = None) -> tuple[str, str, int, int]:
        found = [o for o in scene.objects if shape in (None, o[0]) and color in (None, o[1])]
        if len(found) != 1:
            raise ValueError(f"{question!r} refers to {len(found)} objects in {scene.objects}, not exactly one.")
        return found[0]

    text = question.strip()
    family = question_family(text)
    groups = _PATTERNS[family].match(text).groups()
    if family == "color":
        return the(shape=groups[0])[1]
    if family == "shape":
        return the(color=groups[0])[0]
    if family == "exist":
        return YES if any(o[1] == groups[0] and o[0] == groups[1] for o in scene.objects) else NO
    if family == "count":
        return str(sum(o[1] == groups[0] for o in scene.objects))
    first, second = the(color=groups[0], shape=groups[1]), the(color=groups[2], shape=groups[3])
    if first[3] == second[3]:
        raise ValueError(f"{question!r} compares two objects in the same column in {scene.objects}.")
    return YES if first[3] < second[3] else NO


def _question_template(question: str) -> str:
    return " ".join("<color>" if w in PALETTE else "<shape>" if w in SHAPES else w for w in question.split())


def blind_baseline(train, test) -> dict[str, float]:
    """Test accuracy of the best question-only predictor learned from `train`: no image, just the question text.

    The prediction is the majority training answer for the exact question text, falling back to the majority answer
    of its template (colour and shape words masked) and then of its family. A model trained on the images must beat
    these numbers to have learned anything from them.

    Args:
        train (`datasets.Dataset` or `dict` of lists): needs the `question`, `answer` and `family` columns.
        test (`datasets.Dataset` or `dict` of lists): the same columns.

    Returns:
        `dict[str, float]`: `"overall"` accuracy and one accuracy per family present in `test`.
    """
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_template: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for question, answer, family in zip(train["question"], train["answer"], train["family"]):
        by_text[question][answer] += 1
        by_template[_question_template(question)][answer] += 1
        by_family[family][answer] += 1
    correct: dict[str, list[bool]] = defaultdict(list)
    for question, answer, family in zip(test["question"], test["answer"], test["family"]):
        counts = by_text.get(question) or by_template.get(_question_template(question)) or by_family.get(family)
        # Ties go to the alphabetically first answer so the baseline is deterministic.
        prediction = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else None
        correct[family].append(prediction == answer)
    results = {"overall": float(np.mean([c for v in correct.values() for c in v])) if correct else float("nan")}
    results.update({family: float(np.mean(correct[family])) for family in FAMILIES if family in correct})
    return results

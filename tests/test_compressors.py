"""Visual token compressors: the shared contract for every registered method, then each method against a reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_sparse_mllm.compressors import (
    TokenCompressor,
    get_compressor,
    list_compressors,
    register_compressor,
    registry,
)
from hf_sparse_mllm.compressors.redundancy import neighbour_redundancy

GRID = (6, 6)
NUM_TOKENS = GRID[0] * GRID[1]
DIM = 8


def make_context(num_images: int, num_tokens: int = NUM_TOKENS, grid_size=GRID, seed: int = 0) -> dict:
    """A superset of what any method needs, plus a key no method knows (it must be ignored)."""
    return {
        "grid_size": grid_size,
        "cls_attention": torch.rand(num_images, num_tokens, generator=torch.Generator().manual_seed(seed + 1)),
        "generator": torch.Generator().manual_seed(seed),
        "unrelated_key": "ignored",
    }


def budgets(name: str) -> list[int]:
    compressor = get_compressor(name)
    return sorted({compressor.budget(NUM_TOKENS, keep_ratio=r, grid_size=GRID) for r in (0.03, 0.1, 0.25, 0.6)})


# -- the contract every registered method honours -----------------------------------------------------------------
@pytest.mark.parametrize("name", list_compressors())
def test_indices_contract(name):
    compressor = get_compressor(name)
    features = torch.randn(3, NUM_TOKENS, DIM)
    for k in budgets(name):
        indices = compressor(features, k, **make_context(3))
        assert indices.shape == (3, k)
        assert indices.dtype == torch.long
        assert indices.min() >= 0 and indices.max() < NUM_TOKENS
        assert bool((indices[:, 1:] > indices[:, :-1]).all()), "rows must be sorted ascending and unique"


@pytest.mark.parametrize("name", list_compressors())
def test_keep_ratio_one_keeps_everything(name):
    compressor = get_compressor(name)
    k = compressor.budget(NUM_TOKENS, keep_ratio=1.0, grid_size=GRID)
    assert k == NUM_TOKENS
    features = torch.randn(2, NUM_TOKENS, DIM)
    assert torch.equal(compressor(features, k, **make_context(2)), torch.arange(NUM_TOKENS).expand(2, -1))
    assert torch.equal(compressor.compress(features, k, **make_context(2)), features)


@pytest.mark.parametrize("name", list_compressors())
def test_compress_shape_dtype_and_gradient(name):
    compressor = get_compressor(name)
    k = compressor.budget(NUM_TOKENS, keep_ratio=0.25, grid_size=GRID)
    features = torch.randn(2, NUM_TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    kept = compressor.compress(features, k, **make_context(2))
    assert kept.shape == (2, k, DIM)
    assert kept.dtype == torch.float64
    (kept * torch.randn_like(kept)).sum().backward()
    assert features.grad is not None
    touched = features.grad.abs().sum(-1) > 0  # (num_images, num_tokens)
    assert bool(touched.any(dim=1).all()), "every image's features must receive gradient"
    if name != "pool":  # a subset: exactly the kept rows receive gradient
        indices = compressor(features, k, **make_context(2))
        expected = torch.zeros_like(touched).scatter_(1, indices, True)
        assert torch.equal(touched, expected)


@pytest.mark.parametrize("name", [n for n in list_compressors() if n != "random"])
def test_batched_equals_one_image_at_a_time(name):
    compressor = get_compressor(name)
    k = compressor.budget(NUM_TOKENS, keep_ratio=0.25, grid_size=GRID)
    features = torch.randn(4, NUM_TOKENS, DIM)
    context = make_context(4)
    batched = compressor(features, k, **context)
    for i in range(4):
        single = {**context, "cls_attention": context["cls_attention"][i : i + 1]}
        assert torch.equal(batched[i : i + 1], compressor(features[i : i + 1], k, **single))


@pytest.mark.parametrize("name", list_compressors())
def test_invalid_features_and_k(name):
    compressor = get_compressor(name)
    context = make_context(2)
    with pytest.raises(ValueError, match="num_images, num_tokens, dim"):
        compressor(torch.randn(NUM_TOKENS, DIM), 4, **context)
    for k in (0, NUM_TOKENS + 1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, num_tokens\] = \[1, {NUM_TOKENS}\], got {k}"):
            compressor(torch.randn(2, NUM_TOKENS, DIM), k, **context)
    with pytest.raises(TypeError, match="integer"):
        compressor(torch.randn(2, NUM_TOKENS, DIM), 4.0, **context)


@pytest.mark.parametrize("name", list_compressors())
def test_budget_errors_name_the_argument(name):
    compressor = get_compressor(name)
    for ratio in (0, 1.5):
        with pytest.raises(ValueError, match=rf"keep_ratio must be in \(0, 1\], got {ratio}"):
            compressor.budget(NUM_TOKENS, keep_ratio=ratio, grid_size=GRID)
    for num_keep in (0, NUM_TOKENS + 1):
        with pytest.raises(ValueError, match=rf"num_keep .*{NUM_TOKENS} visual tokens.*got {num_keep}"):
            compressor.budget(NUM_TOKENS, keep_ratio=0.5, num_keep=num_keep, grid_size=GRID)


def test_default_budget_rounds():
    divprune = get_compressor("divprune")
    # The reference DivPrune code gets 57 from int((1 - 0.9) * 576); we round.
    assert divprune.budget(576, keep_ratio=0.1) == 58
    assert divprune.budget(576, keep_ratio=0.25) == 144
    assert divprune.budget(10, keep_ratio=0.01) == 1
    assert divprune.budget(576, keep_ratio=0.1, num_keep=57) == 57


# -- divprune ----------------------------------------------------------------------------------------------------
def divprune_reference(x: list[list[float]], k: int) -> list[int]:
    """The greedy max-min definition, one image, plain Python in float64."""
    n = len(x)

    def distance(i, j):
        dot = sum(a * b for a, b in zip(x[i], x[j]))
        norm_i = math.sqrt(sum(a * a for a in x[i]))
        norm_j = math.sqrt(sum(b * b for b in x[j]))
        return 1.0 - dot / (norm_i * norm_j)

    d = [[distance(i, j) for j in range(n)] for i in range(n)]
    best_first, best_value = None, -math.inf
    for i in range(n):
        nearest = min(d[i][j] for j in range(n) if j != i)
        if nearest > best_value:  # strict: the lowest index wins ties
            best_first, best_value = i, nearest
    selected = [best_first]
    while len(selected) < k:
        best_j, best_value = None, -math.inf
        for j in range(n):
            if j in selected:
                continue
            value = min(d[s][j] for s in selected)
            if value > best_value:
                best_j, best_value = j, value
        selected.append(best_j)
    return sorted(selected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_matches_bruteforce_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 25, 6, generator=generator)
    features[1] += 2.0  # not centred: cosine, not Euclidean, geometry must matter
    divprune = get_compressor("divprune")
    for k in (1, 2, 7, 24):
        indices = divprune(features, k)
        for i in range(features.shape[0]):
            assert indices[i].tolist() == divprune_reference(features[i].double().tolist(), k), (seed, k, i)


def test_divprune_ties_go_to_the_lowest_index():
    features = torch.eye(6).unsqueeze(0)  # all pairwise distances are exactly 1
    assert get_compressor("divprune")(features, 3).tolist() == [[0, 1, 2]]


def test_divprune_prefers_diverse_tokens():
    base = torch.randn(4, 16)
    features = torch.cat([base, base.repeat(5, 1) + 1e-3 * torch.randn(20, 16)]).unsqueeze(0)  # 4 groups of 6
    kept = get_compressor("divprune")(features, 4)[0]
    assert sorted((kept % 4).tolist()) == [0, 1, 2, 3], "one token from each group of near-duplicates"


# -- pool ------------------------------------------------------------------------------------------------------------
def test_pool_equals_avg_pool2d_on_24x24():
    pool = get_compressor("pool")
    features = torch.randn(2, 576, 5)
    k = pool.budget(576, keep_ratio=0.25, grid_size=(24, 24))
    assert k == 144
    grid = features.transpose(1, 2).reshape(2, 5, 24, 24)
    expected = F.avg_pool2d(grid, 2, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool.compress(features, k, grid_size=(24, 24)), expected)
    top_left = [2 * r * 24 + 2 * c for r in range(12) for c in range(12)]
    assert pool(features, k).tolist() == [top_left, top_left]


def test_pool_by_hand_on_4x4_and_partial_windows_on_5x5():
    pool = get_compressor("pool")
    four = torch.arange(16.0).reshape(1, 16, 1)
    # Windows {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    assert pool.compress(four, 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool(four, 4).tolist() == [[0, 2, 8, 10]]
    five = torch.arange(25.0).reshape(1, 25, 1)
    k = pool.budget(25, keep_ratio=0.25)
    assert k == 9  # stride 2, ceil mode: the last row and column of windows are partial
    out = pool.compress(five, k).flatten().tolist()
    assert out[0] == (0 + 1 + 5 + 6) / 4
    assert out[2] == (4 + 9) / 2
    assert out[6] == (20 + 21) / 2
    assert out[8] == 24
    assert pool(five, k).tolist() == [[0, 2, 4, 10, 12, 14, 20, 22, 24]]


def test_pool_budgets_snap_to_grids():
    pool = get_compressor("pool")
    assert pool.budget(576, keep_ratio=0.1, grid_size=(24, 24)) == 64  # stride round(sqrt(10)) = 3
    assert pool.budget(24, keep_ratio=0.25, grid_size=(4, 6)) == 6
    assert pool.budget(576, keep_ratio=0.5, num_keep=72, grid_size=(24, 24)) == 72
    features = torch.randn(1, 576, 3)
    grid = features.transpose(1, 2).reshape(1, 3, 24, 24)
    expected = F.avg_pool2d(grid, (2, 4), (2, 4)).flatten(2).transpose(1, 2)  # 12x6 cells, closest to square
    torch.testing.assert_close(pool.compress(features, 72, grid_size=(24, 24)), expected)
    with pytest.raises(ValueError, match=r"num_keep=37 tokens from a 24x24 patch grid; valid budgets are \[1, 2,"):
        pool.budget(576, num_keep=37, grid_size=(24, 24))
    with pytest.raises(ValueError, match="k=37"):
        pool.compress(features, 37, grid_size=(24, 24))
    with pytest.raises(ValueError, match="grid_size"):
        pool.compress(torch.randn(1, 577, 3), 100)
    # A 2x5 grid to 2 cells: 3x3 windows clipped to the grid, {0,1,2,5,6,7} and {3,4,8,9}.
    assert pool.compress(torch.arange(10.0).reshape(1, 10, 1), 2, grid_size=(2, 5)).flatten().tolist() == [3.5, 6.0]


# -- random ------------------------------------------------------------------------------------------------------
def test_random_is_reproducible_and_seeded():
    compressor = get_compressor("random")
    features = torch.randn(2, 100, 4)
    a = compressor(features, 10, generator=torch.Generator().manual_seed(7))
    b = compressor(features, 10, generator=torch.Generator().manual_seed(7))
    c = compressor(features, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "images get independent subsets"
    with pytest.raises(ValueError, match="generator"):
        compressor(features, 10)


def test_random_is_uniform():
    counts = get_compressor("random")(torch.zeros(4000, 10, 1), 3, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(counts.flatten(), minlength=10).double() / 4000
    torch.testing.assert_close(frequency, torch.full((10,), 0.3, dtype=torch.float64), atol=0.03, rtol=0)


# -- redundancy --------------------------------------------------------------------------------------------------
def test_redundancy_keeps_objects_on_a_flat_background():
    rows, cols = 8, 10
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, generator=generator).expand(2, rows * cols, 16).clone()  # flat background
    objects = [[0, 23, 47, 79], [11, 35, 58, 62]]  # isolated cells, corners and borders included
    for i, cells in enumerate(objects):
        features[i, cells] = torch.randn(len(cells), 16, generator=generator)
    kept = get_compressor("redundancy")(features, 4, grid_size=(rows, cols))
    assert kept.tolist() == objects


def test_redundancy_score_matches_loops_over_8_neighbours():
    rows, cols = 5, 7
    features = torch.randn(2, rows * cols, 4)
    score = neighbour_redundancy(features, (rows, cols))
    unit = F.normalize(features, dim=-1)
    for i in range(2):
        for r in range(rows):
            for c in range(cols):
                neighbours = [
                    (r + dr) * cols + (c + dc)
                    for dr in (-1, 0, 1)
                    for dc in (-1, 0, 1)
                    if (dr, dc) != (0, 0) and 0 <= r + dr < rows and 0 <= c + dc < cols
                ]
                expected = max(float(unit[i, r * cols + c] @ unit[i, j]) for j in neighbours)
                assert score[i, r * cols + c].item() == pytest.approx(expected, abs=1e-6)


def test_redundancy_ties_keep_lower_indices():
    features = torch.full((1, 16, 4), 0.5)  # exactly equal similarities everywhere
    assert get_compressor("redundancy")(features, 3).tolist() == [[0, 1, 2]]


# -- cls_attention -------------------------------------------------------------------------------------------------
def test_cls_attention_keeps_the_top_k():
    compressor = get_compressor("cls_attention")
    assert compressor.requires == frozenset({"cls_attention"})
    attention = torch.rand(3, NUM_TOKENS)
    kept = compressor(torch.randn(3, NUM_TOKENS, DIM), 5, cls_attention=attention)
    assert torch.equal(kept, attention.topk(5, dim=1).indices.sort(dim=1).values)
    ties = compressor(torch.randn(1, NUM_TOKENS, DIM), 3, cls_attention=torch.ones(1, NUM_TOKENS))
    assert ties.tolist() == [[0, 1, 2]]


def test_cls_attention_missing_or_misshapen():
    compressor = get_compressor("cls_attention")
    features = torch.randn(2, NUM_TOKENS, DIM)
    with pytest.raises(ValueError, match=r"needs context\['cls_attention'\]"):
        compressor(features, 4, grid_size=GRID)
    with pytest.raises(ValueError, match=r"shape \(num_images, num_tokens\) = \(2, 36\), got \(2, 35\)"):
        compressor(features, 4, cls_attention=torch.rand(2, 35))


# -- registry ------------------------------------------------------------------------------------------------------
@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test disappear after it."""
    monkeypatch.setattr(registry, "_COMPRESSORS", dict(registry._COMPRESSORS))


def test_builtin_methods_are_registered():
    assert list_compressors() == sorted(list_compressors())
    assert {"cls_attention", "divprune", "pool", "random", "redundancy"} <= set(list_compressors())
    assert all(isinstance(get_compressor(name), TokenCompressor) for name in list_compressors())


def test_duplicate_name_is_refused(scratch_registry):
    class Other(TokenCompressor):
        pass

    with pytest.raises(ValueError, match=r"'divprune' is already taken by DivPruneCompressor.*another name"):
        register_compressor("divprune")(Other)
    with pytest.raises(TypeError, match="TokenCompressor subclasses"):
        register_compressor("not_a_compressor")(object)


def test_unknown_name_lists_registered_names():
    with pytest.raises(ValueError, match="Unknown token compressor 'nope'") as error:
        get_compressor("nope")
    for name in list_compressors():
        assert repr(name) in str(error.value)


def test_custom_method_registers_and_is_found(scratch_registry):
    seen = {}

    @register_compressor("last_k", requires=("saliency",))
    class LastK(TokenCompressor):
        def select(self, features, k, **context):
            seen.update(grad=torch.is_grad_enabled(), requires_grad=features.requires_grad, dtype=features.dtype)
            n = features.shape[1]
            return torch.arange(n - 1, n - k - 1, -1).expand(features.shape[0], k)  # deliberately unsorted

    compressor = get_compressor("last_k")
    assert isinstance(compressor, LastK)
    assert compressor.name == "last_k" and compressor.requires == frozenset({"saliency"})
    assert "last_k" in list_compressors() and list_compressors() == sorted(list_compressors())
    assert compressor(torch.randn(2, 6, 3), 2).tolist() == [[4, 5], [4, 5]]
    features = torch.randn(2, 6, 3, dtype=torch.bfloat16, requires_grad=True)
    compressor.compress(features, 2).sum().backward()
    assert seen == {"grad": False, "requires_grad": False, "dtype": torch.float32}, "select sees a detached fp32 copy"
    assert features.grad[:, 4:].abs().sum() > 0 and features.grad[:, :4].abs().sum() == 0

    @register_compressor("broken")
    class Broken(TokenCompressor):
        def select(self, features, k, **context):
            return torch.arange(k + 1).expand(features.shape[0], k + 1)

    with pytest.raises(RuntimeError, match=r"'broken' returned indices of shape \(2, 3\), expected \(2, 2\)"):
        get_compressor("broken")(torch.randn(2, 6, 3), 2)


def test_grid_methods_need_a_grid():
    features = torch.randn(1, 10, 4)
    for name in ("pool", "redundancy"):
        with pytest.raises(ValueError, match="not a square grid; pass grid_size"):
            get_compressor(name)(features, 2)
        with pytest.raises(ValueError, match=r"grid_size=\(3, 3\) does not match 10 tokens"):
            get_compressor(name)(features, 2, grid_size=(3, 3))
    assert get_compressor("redundancy")(features, 2, grid_size=(2, 5)).shape == (1, 2)

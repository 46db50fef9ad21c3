"""Patterns and masks (Lin et al. 2022, Sec. 2.2): hand-computed cases, properties, ties, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune_core.masks import (
    GROUP_SCORES,
    PATTERN_SPECS,
    PATTERNS,
    SELECT_SAMPLE,
    as_blocks,
    as_matrix,
    block_regions,
    check_shape,
    expand_groups,
    groups_of,
    make_group_mask,
    make_mask,
    num_pruned,
    rank_groups,
)
from fedprune_core.scores import NORMS

T, F = True, False

# Columns of W: c0 = [3, 3, 0, 0] (L1 6, L2 18), c1 = [5, 0, 0, 0] (L1 5, L2 25),
# c2 = [1, 1, 1, 1] (L1 4, L2 4), c3 = [0, 2, -2, 0] (L1 4, L2 8). Rows of W.T are these columns.
W = torch.tensor([
    [3.0, 5.0, 1.0, 0.0],
    [3.0, 0.0, 1.0, 2.0],
    [0.0, 0.0, 1.0, -2.0],
    [0.0, 0.0, 1.0, 0.0],
])  # fmt: skip


def _cols(*keep: bool) -> torch.Tensor:
    return torch.tensor(keep)[None, :].expand(4, 4)


def _rows(*keep: bool) -> torch.Tensor:
    return torch.tensor(keep)[:, None].expand(4, 4)


# (matrix, pattern, sparsity, norm, expected mask), each worked out by hand in the comment.
HAND_CASES = [
    # 16 entries, prune round(8) = 8: keep |w| = 5, 3, 3, 2, 2 and the first three 1s (index order);
    # the 1 at (3, 2) loses the tie. L1 and L2 rank entries alike.
    (W, "unstructured", 0.5, "l1", [[T, T, T, F], [T, F, T, T], [F, F, T, T], [F, F, F, F]]),
    (W, "unstructured", 0.5, "l2", [[T, T, T, F], [T, F, T, T], [F, F, T, T], [F, F, F, F]]),
    # column scores L1 [6, 5, 4, 4]: prune 1 -> the tie of c2, c3 drops c3 (higher index);
    # L2 [18, 25, 4, 8]: drop c2.
    (W, "column", 0.25, "l1", _cols(T, T, T, F)),
    (W, "column", 0.25, "l2", _cols(T, T, F, T)),
    # keep 1 column: L1 keeps c0 (6), L2 keeps c1 (25).
    (W, "column", 0.75, "l1", _cols(T, F, F, F)),
    (W, "column", 0.75, "l2", _cols(F, T, F, F)),
    # the same numbers as rows of W.T
    (W.T, "row", 0.25, "l1", _rows(T, T, T, F)),
    (W.T, "row", 0.25, "l2", _rows(T, T, F, T)),
    (W.T, "row", 0.75, "l2", _rows(F, T, F, F)),
    # half_column groups (top = rows 0-1, bottom = rows 2-3) x columns:
    # L1 top [6, 5, 2, 2], bottom [0, 0, 2, 2]; 8 groups, keep 4: 6, 5 and the first two 2s (top c2, top c3).
    (W, "half_column", 0.5, "l1", [[T, T, T, T], [T, T, T, T], [F, F, F, F], [F, F, F, F]]),
    # L2 top [18, 25, 2, 4], bottom [0, 0, 2, 4]: keep 25, 18, 4 (top c3), 4 (bottom c3).
    (W, "half_column", 0.5, "l2", [[T, T, F, T], [T, T, F, T], [F, F, F, T], [F, F, F, T]]),
    # half_row groups of W.T (left = columns 0-1, right = 2-3), the transpose of the above:
    # L1 [[6, 0], [5, 0], [2, 2], [2, 2]] keep 6, 5, (r2 left), (r2 right).
    (W.T, "half_row", 0.5, "l1", [[T, T, F, F], [T, T, F, F], [T, T, T, T], [F, F, F, F]]),
    # L2 [[18, 0], [25, 0], [2, 2], [4, 4]] keep 25, 18, 4, 4.
    (W.T, "half_row", 0.5, "l2", [[T, T, F, F], [T, T, F, F], [F, F, F, F], [T, T, T, T]]),
]


@pytest.mark.parametrize(("matrix", "pattern", "sparsity", "norm", "expected"), HAND_CASES)
def test_hand_computed_masks(
    matrix: torch.Tensor, pattern: str, sparsity: float, norm: str, expected: object
) -> None:
    mask = make_mask(NORMS[norm](matrix), sparsity, pattern)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.as_tensor(expected).expand(4, 4))


@pytest.mark.parametrize(
    ("pattern", "grid"),
    [
        ("unstructured", [[1.0, 2.0], [3.0, 4.0]]),
        ("row", [3.0, 7.0]),
        ("column", [4.0, 6.0]),
        ("half_row", [[1.0, 2.0], [3.0, 4.0]]),
        ("half_column", [[1.0, 2.0], [3.0, 4.0]]),
    ],
)
def test_group_scores_are_sums_over_each_group(pattern: str, grid: list[float]) -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(GROUP_SCORES[pattern](s), torch.tensor(grid))


def test_half_patterns_split_a_wider_matrix_in_the_middle() -> None:
    s = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert torch.equal(GROUP_SCORES["half_row"](s)[0], torch.tensor([0.0 + 1 + 2, 3.0 + 4 + 5]))
    assert torch.equal(GROUP_SCORES["half_column"](s)[:, 0], torch.tensor([0.0 + 6, 12.0 + 18]))
    keep = torch.tensor([[True, False]] * 4)  # left halves of every row
    assert torch.equal(expand_groups(keep, "half_row", (4, 6))[0], torch.tensor([T, T, T, F, F, F]))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_entry_expands_and_reads_back_its_own_groups(pattern: str) -> None:
    spec = PATTERN_SPECS[pattern]
    scores = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(spec.group_scores(scores).shape, generator=torch.Generator().manual_seed(1)) < 0.5
    mask = spec.expand(keep, (4, 6))
    assert mask.shape == (4, 6) and torch.equal(spec.groups_of(mask), keep)
    # every kept entry's group score counts it: the grid's sum is the kept entries' sum
    assert torch.allclose(spec.group_scores(scores)[keep].sum(), scores[mask].sum())
    covered = torch.zeros(4, 6, dtype=torch.int64)
    for r0, r1, c0, c1 in spec.regions((4, 6)):
        covered[r0:r1, c0:c1] += 1
    assert torch.equal(covered, torch.ones(4, 6, dtype=torch.int64))  # the regions tile the matrix


def test_block_regions_per_stacked_matrix_and_half() -> None:
    assert block_regions((6, 4), "column", splits=3) == [(0, 2, 0, 4), (2, 4, 0, 4), (4, 6, 0, 4)]
    assert block_regions((4, 6), "half_row") == [(0, 4, 0, 3), (0, 4, 3, 6)]
    assert block_regions((8, 3), "half_column", splits=2) == [(0, 2, 0, 3), (2, 4, 0, 3), (4, 6, 0, 3), (6, 8, 0, 3)]


@pytest.mark.parametrize(("pattern", "shape", "message"), [
    ("half_row", (4, 5), r"shape \(4, 5\) has an odd number of columns \(5\): half_row needs an even number"),
    ("half_column", (3, 4), r"shape \(3, 4\) has an odd number of rows \(3\): half_column needs an even number"),
])
def test_half_patterns_need_an_even_size(pattern: str, shape: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_shape(shape, pattern, "w")
    for other in ("unstructured", "row", "column"):
        check_shape(shape, other, "w")


def test_sparsity_zero_keeps_everything_and_num_pruned_rounds_half_up() -> None:
    for pattern in PATTERNS:
        assert make_mask(torch.rand(4, 6), 0.0, pattern).all()
    assert [num_pruned(10, s) for s in (0.0, 0.04, 0.05, 0.15, 0.5, 0.94)] == [0, 0, 1, 2, 5, 9]
    assert num_pruned(0, 0.5) == 0


def test_sparsity_below_one_never_empties_a_layer() -> None:
    # 0.9 of 4 groups rounds to 4; sparsity < 1 promises something stays: prune 3 (within one group).
    assert num_pruned(4, 0.9) == 3 and num_pruned(1, 0.6) == 0
    mask = make_mask(torch.rand(4, 3), 0.9, "row")
    assert int(mask[:, 0].sum()) == 1


def test_ties_keep_lower_index_first() -> None:
    mask = make_mask(torch.ones(2, 5), 0.6, "column")  # prune 3 of 5 equal columns
    assert mask[0].tolist() == [T, T, F, F, F]
    assert rank_groups(torch.tensor([1.0, 2.0, 1.0, 2.0])).tolist() == [1, 3, 0, 2]


def test_favored_groups_win_ties_only() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    favored = torch.tensor([[F, F, T, T]])
    # keep 2 of 4 columns: column 2 (favored) wins the tie at 1.0 over columns 0, 1; column 3 is lower
    assert make_mask(scores, 0.5, "column", favored=favored)[0].tolist() == [T, F, T, F]


def test_allowed_groups_are_kept_before_any_other() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    allowed = torch.tensor([[F, T, T, T]])
    # nested: the pruned column 0 stays pruned although it scores highest
    assert make_mask(scores, 0.5, "unstructured", allowed=allowed)[0].tolist() == [F, T, T, F]
    # keeping more groups than allowed: all allowed plus the best of the rest
    assert make_mask(scores, 0.25, "unstructured", allowed=torch.tensor([[F, F, T, T]]))[0].tolist() == [
        T,
        F,
        T,
        T,
    ]


def test_rank_greater_than_two_reshapes_to_rows_and_back() -> None:
    conv = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert as_matrix(conv).shape == (2, 6)
    mask = make_mask(as_matrix(conv).abs(), 0.5, "column").reshape(conv.shape)
    assert mask.shape == (2, 3, 2)
    assert torch.equal(mask[0], torch.tensor([[F, F], [F, T], [T, T]]))  # the 3 largest columns of 6
    assert as_matrix(torch.ones(5)).shape == (5, 1)
    assert [b.shape for b in as_blocks(torch.zeros(6, 4), 3)] == [(2, 4)] * 3


def test_a_convolutions_column_is_an_input_channel_with_all_its_taps() -> None:
    # (out 2, in 3, taps 2) viewed as (2, 6); channel scores: 0+1+6+7 = 14, 2+3+8+9 = 22, 4+5+10+11 = 30
    conv = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = make_mask(as_matrix(conv), 0.34, "column", taps=2).reshape(conv.shape)
    assert mask[:, 0].eq(False).all() and mask[:, 1:].all()  # channel 0 pruned, whole
    # per tap (taps=1) the same scores prune two single columns instead: 0+6 and 1+7
    assert make_mask(as_matrix(conv), 0.34, "column").reshape(conv.shape)[:, 0].tolist() == [[F, F], [F, F]]
    # half_column: a channel for the top or bottom half of the filters; scores [[1, 5, 9], [13, 17, 21]]
    half = make_mask(as_matrix(conv), 0.34, "half_column", taps=2).reshape(conv.shape)
    assert half[1].all() and half[0, 2].all() and not half[0, :2].any()
    assert groups_of(as_matrix(half), "half_column", taps=2).tolist() == [[F, F, T], [T, T, T]]
    keep = torch.tensor([T, F, T])
    assert torch.equal(expand_groups(keep, "column", (2, 6), taps=2), torch.tensor([T, T, F, F, T, T]).expand(2, 6))
    # the other patterns do not group taps
    assert torch.equal(make_mask(as_matrix(conv), 0.5, "row", taps=2), make_mask(as_matrix(conv), 0.5, "row"))


def test_taps_must_divide_the_columns() -> None:
    with pytest.raises(ValueError, match=r"taps=4 must be a positive divisor of the scores' 6 columns"):
        make_mask(torch.ones(2, 6), 0.5, "column", taps=4)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"sparsity": 1.0}, ["sparsity=1.0", "[0, 1)", "0.5"]),
        ({"sparsity": -0.1}, ["sparsity=-0.1", "[0, 1)"]),
        ({"sparsity": True}, ["sparsity=True"]),
        ({"sparsity": "0.5"}, ["sparsity='0.5'"]),
        ({"pattern": "diagonal"}, ["pattern='diagonal'", "unstructured", "half_column"]),
        (
            {"pattern": "half_row", "scores": torch.rand(4, 5)},
            ["(4, 5)", "odd number of columns (5)", "half_row", "use pattern 'row' or 'column'"],
        ),
        ({"pattern": "half_column", "scores": torch.rand(3, 4)}, ["(3, 4)", "odd number of rows (3)"]),
        ({"scores": torch.rand(4)}, ["(4,)", "2-D float", "as_matrix"]),
        ({"scores": torch.ones(2, 2, dtype=torch.int64)}, ["torch.int64", "2-D float"]),
    ],
)
def test_bad_input_names_the_value_the_rule_and_the_fix(
    kwargs: dict[str, object], fragments: list[str]
) -> None:
    args: dict[str, object] = {"scores": torch.rand(4, 4), "sparsity": 0.5, "pattern": "column"} | kwargs
    with pytest.raises(ValueError) as err:
        make_mask(**args)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(err.value)


# --- properties --------------------------------------------------------------------------------


@st.composite
def mask_cases(draw: st.DrawFn) -> tuple[torch.Tensor, float, str]:
    pattern = draw(st.sampled_from(PATTERNS))
    rows = draw(st.integers(1, 6)) * (2 if pattern == "half_column" else 1)
    cols = draw(st.integers(1, 6)) * (2 if pattern == "half_row" else 1)
    sparsity = draw(st.floats(0.0, 0.999))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # few distinct values: plenty of ties
    scores = torch.randint(0, draw(st.sampled_from([2, 4, 1000])), (rows, cols), generator=g).float()
    return scores, sparsity, pattern


@settings(max_examples=50, deadline=None)
@given(mask_cases())
def test_exact_kept_counts_and_highest_groups_kept(case: tuple[torch.Tensor, float, str]) -> None:
    scores, sparsity, pattern = case
    mask = make_mask(scores, sparsity, pattern)
    groups = groups_of(mask, pattern)
    shape = (scores.shape[0], scores.shape[1])
    assert torch.equal(expand_groups(groups, pattern, shape), mask)  # whole groups only
    n = groups.numel()
    assert int((~groups).sum()) == num_pruned(n, sparsity)
    assert abs(num_pruned(n, sparsity) - sparsity * n) < 1.0  # realized sparsity within one group
    grid = GROUP_SCORES[pattern](scores)
    if groups.any() and (~groups).any():
        assert grid[groups].min() >= grid[~groups].max()
    assert torch.equal(make_mask(scores, sparsity, pattern), mask)  # deterministic


@settings(max_examples=50, deadline=None)
@given(mask_cases(), st.integers(0, 2**16))
def test_selection_equals_the_full_stable_ranking(case: tuple[torch.Tensor, float, str], seed: int) -> None:
    scores, sparsity, pattern = case
    grid = GROUP_SCORES[pattern](scores)
    g = torch.Generator().manual_seed(seed)
    favored = torch.rand(grid.shape, generator=g) < 0.5
    allowed = torch.rand(grid.shape, generator=g) < 0.7
    for fav, allow in [(None, None), (favored, None), (None, allowed), (favored, allowed)]:
        n_keep = grid.numel() - num_pruned(grid.numel(), sparsity)
        expected = torch.zeros(grid.numel(), dtype=torch.bool)
        expected[rank_groups(grid, fav, allow)[:n_keep]] = True
        assert torch.equal(make_group_mask(grid, sparsity, fav, allow), expected.reshape(grid.shape))


@settings(max_examples=50, deadline=None)
@given(mask_cases())
def test_masks_are_nested_as_sparsity_grows_with_allowed(case: tuple[torch.Tensor, float, str]) -> None:
    scores, sparsity, pattern = case
    first = make_mask(scores, sparsity / 2, pattern)
    second = make_mask(scores.flip(0), sparsity, pattern, allowed=first, favored=first)
    assert not (second & ~first).any()  # nothing pruned comes back


def _large_scores(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(n, generator=g)
    if kind == "few_values":
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "sampled_stride_sees_one_value":  # the bracket from the strided sample misses
        return (torch.arange(n) % (n // SELECT_SAMPLE) == 0).float()
    if kind == "sorted":
        return torch.arange(n, dtype=torch.float32)
    scores = torch.rand(n, generator=g)  # -inf scores among the allowed ones, or NaN (diverged training)
    scores[torch.rand(n, generator=g) < 0.6] = -torch.inf if kind == "minus_inf" else torch.nan
    return scores


@pytest.mark.parametrize(
    "kind", ["continuous", "few_values", "sampled_stride_sees_one_value", "sorted", "minus_inf", "nan"]
)
def test_selection_on_large_layers_equals_the_full_stable_ranking(kind: str) -> None:
    # above 8 * SELECT_SAMPLE groups the k-th largest score is bracketed from a sample first
    n = 8 * SELECT_SAMPLE + 1000
    g = torch.Generator().manual_seed(1)
    scores = _large_scores(kind, n, g)
    favored = torch.rand(n, generator=g) < 0.5
    allowed = torch.rand(n, generator=g) < 0.8
    for sparsity, fav, allow in [(0.3, None, None), (0.3, favored, allowed), (0.1, favored, allowed)]:
        n_keep = n - num_pruned(n, sparsity)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[rank_groups(scores, fav, allow)[:n_keep]] = True
        assert torch.equal(make_group_mask(scores, sparsity, fav, allow), expected)

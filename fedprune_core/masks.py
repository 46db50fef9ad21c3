"""Pruning patterns and masks (Lin et al. 2022, Sec. 2.2).

A pattern partitions a 2-D weight W of shape (out, in) into groups; a mask keeps the
highest-scoring groups. Group score = sum of its entries' scores, so with per-entry scores
|x| (L1) or x**2 (L2) the ranking equals that of the group's L1 or L2 norm.

| pattern       | one group is                                  | group grid    |
|---------------|-----------------------------------------------|---------------|
| unstructured  | one entry                                     | (out, in)     |
| row           | one output row W[i, :]                        | (out,)        |
| column        | one input column W[:, j]                      | (in,)         |
| half_row      | the left or right half of a row (even in)     | (out, 2)      |
| half_column   | the top or bottom half of a column (even out) | (2, in)       |

Each pattern is one `PatternSpec` in `PATTERN_SPECS`: its group scores, expansion, group ids,
the dense blocks a client trains and its shape rule, all in one entry; everything else
(masks, submodels, Federated Dropout) looks a pattern up there.

A convolution with several input channels, seen as (out, in * taps), prunes whole input channels
under the column patterns: its column is the `taps` adjacent columns of one input channel (all
its kernel taps), so a client trains a narrower convolution (channel pruning). Each function
below takes that width as `taps` (1: one column).

Ties are broken stably: groups in `favored` (e.g. currently kept) first, then lower index first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Region = tuple[int, int, int, int]
"""(first row, end row, first column, end column) of a block of a 2-D weight."""


@dataclass(frozen=True)
class PatternSpec:
    """One pruning pattern: how it splits a 2-D weight (out, in) into groups.

    Attributes:
        name: the pattern's name in configs.
        group_scores: (out, in) entry scores -> the groups' summed scores, on the group grid.
        expand: (group grid mask, (out, in)) -> (out, in) entry mask.
        groups_of: (out, in) entry mask made with this pattern -> group grid mask.
        regions: (out, in) -> the regions a structured mask keeps one dense block of (a sliced
            layer trains one block per region): the whole matrix, or its two halves.
        even_dim: the dimension (0: rows, 1: columns) whose size must be even, or None.
        by_channel: a convolution's column is one input channel, its `taps` adjacent columns.
        entrywise: a group is one entry: nothing to slice, and a packed bit mask is smaller than
            group ids.
    """

    name: str
    group_scores: Callable[[torch.Tensor], torch.Tensor]
    expand: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    groups_of: Callable[[torch.Tensor], torch.Tensor]
    regions: Callable[[tuple[int, int]], list[Region]]
    even_dim: int | None = None
    by_channel: bool = False
    entrywise: bool = False


def _whole(shape: tuple[int, int]) -> list[Region]:
    return [(0, shape[0], 0, shape[1])]


def _column_halves(shape: tuple[int, int]) -> list[Region]:
    out_f, in_f = shape
    return [(0, out_f, 0, in_f // 2), (0, out_f, in_f // 2, in_f)]


def _row_halves(shape: tuple[int, int]) -> list[Region]:
    out_f, in_f = shape
    return [(0, out_f // 2, 0, in_f), (out_f // 2, out_f, 0, in_f)]


PATTERN_SPECS: dict[str, PatternSpec] = {
    p.name: p
    for p in (
        PatternSpec(
            "unstructured",
            group_scores=lambda s: s,
            expand=lambda keep, shape: keep.reshape(shape),
            groups_of=lambda mask: mask,
            regions=_whole,
            entrywise=True,
        ),
        PatternSpec(
            "row",
            group_scores=lambda s: s.sum(dim=1),
            expand=lambda keep, shape: keep[:, None].expand(shape),
            groups_of=lambda mask: mask[:, 0],
            regions=_whole,
        ),
        PatternSpec(
            "column",
            group_scores=lambda s: s.sum(dim=0),
            expand=lambda keep, shape: keep[None, :].expand(shape),
            groups_of=lambda mask: mask[0, :],
            regions=_whole,
            by_channel=True,
        ),
        PatternSpec(
            "half_row",
            group_scores=lambda s: s.reshape(s.shape[0], 2, s.shape[1] // 2).sum(dim=2),
            expand=lambda keep, shape: keep[:, :, None].expand(shape[0], 2, shape[1] // 2).reshape(shape),
            groups_of=lambda mask: mask.reshape(mask.shape[0], 2, mask.shape[1] // 2)[:, :, 0],
            regions=_column_halves,
            even_dim=1,
        ),
        PatternSpec(
            "half_column",
            group_scores=lambda s: s.reshape(2, s.shape[0] // 2, s.shape[1]).sum(dim=1),
            expand=lambda keep, shape: keep[:, None, :].expand(2, shape[0] // 2, shape[1]).reshape(shape),
            groups_of=lambda mask: mask.reshape(2, mask.shape[0] // 2, mask.shape[1])[:, 0, :],
            regions=_row_halves,
            even_dim=0,
            by_channel=True,
        ),
    )
}
"""Every pattern, by name: the one place a pattern is defined."""

PATTERNS: tuple[str, ...] = tuple(PATTERN_SPECS)
CHANNEL_PATTERNS: tuple[str, ...] = tuple(n for n, p in PATTERN_SPECS.items() if p.by_channel)
"""The patterns whose column of a convolution weight is one input channel (`taps` columns)."""
GROUP_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    n: p.group_scores for n, p in PATTERN_SPECS.items()
}


def validate_pattern(pattern: str) -> None:
    """Raise a ValueError naming `pattern` unless it is a known pattern."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is not a known pattern: use one of {', '.join(PATTERNS)}")


def validate_sparsity(sparsity: float, name: str = "sparsity") -> None:
    """Raise a ValueError unless `sparsity` is a float fraction in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name}={sparsity!r} must be a fraction in [0, 1): pass e.g. 0.5 for 50% pruned")


def check_shape(shape: tuple[int, int], pattern: str, name: str = "weight") -> None:
    """Half patterns need an even number of columns (half_row) or rows (half_column)."""
    dim = PATTERN_SPECS[pattern].even_dim
    if dim is not None and shape[dim] % 2:
        raise ValueError(
            f"{name} of shape {tuple(shape)} has an odd number of {('rows', 'columns')[dim]} ({shape[dim]}): "
            f"{pattern} needs an even number; use pattern 'row' or 'column' for this parameter or exclude it "
            "from prunable"
        )


def group_scores(scores: torch.Tensor, pattern: str, taps: int = 1) -> torch.Tensor:
    """Scores of `pattern`'s groups of a 2-D weight (a column pattern's column: `taps` columns)."""
    spec = PATTERN_SPECS[pattern]
    if taps > 1 and spec.by_channel:
        scores = scores.reshape(scores.shape[0], -1, taps).sum(dim=2)
    return spec.group_scores(scores)


def expand_groups(keep: torch.Tensor, pattern: str, shape: tuple[int, int], taps: int = 1) -> torch.Tensor:
    """Entry mask (out, in) from a group mask on the pattern's group grid."""
    out_f, in_f = shape
    spec = PATTERN_SPECS[pattern]
    if taps > 1 and spec.by_channel:
        return spec.expand(keep, (out_f, in_f // taps)).repeat_interleave(taps, dim=1)
    return spec.expand(keep, (out_f, in_f))


def groups_of(mask: torch.Tensor, pattern: str, taps: int = 1) -> torch.Tensor:
    """Group mask (on the group grid) of an entry mask made with `pattern`."""
    spec = PATTERN_SPECS[pattern]
    if taps > 1 and spec.by_channel:
        mask = mask[:, ::taps]
    return spec.groups_of(mask)


def block_regions(shape: tuple[int, int], pattern: str, splits: int = 1) -> list[Region]:
    """The regions of a 2-D weight of `splits` stacked matrices a structured mask keeps one dense block
    of: per stacked matrix, `pattern`'s regions (the whole matrix, or its two halves)."""
    out_f, in_f = shape
    per = out_f // splits
    regions = PATTERN_SPECS[pattern].regions((per, in_f))
    return [(lo + r0, lo + r1, c0, c1) for lo in range(0, out_f, per) for r0, r1, c0, c1 in regions]


def num_pruned(num_groups: int, sparsity: float) -> int:
    """Groups to prune: sparsity × groups rounded half up, so realized sparsity is within one group.

    At least one group is always kept: sparsity < 1 never empties a layer (0.9 of 4 groups prunes 3).
    """
    return max(0, min(num_groups - 1, int(sparsity * num_groups + 0.5)))


def rank_groups(
    group_scores: torch.Tensor, favored: torch.Tensor | None = None, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat group indices, best first: allowed, then higher score, then favored, then lower index."""
    flat = group_scores.flatten().to(torch.float64)
    order = torch.arange(flat.numel())
    if favored is not None:
        order = order[torch.sort((~favored.flatten()).to(torch.int8)[order], stable=True).indices]
    order = order[torch.sort(flat[order], descending=True, stable=True).indices]
    if allowed is not None:
        order = order[torch.sort((~allowed.flatten()).to(torch.int8)[order], stable=True).indices]
    return order


SELECT_SAMPLE = 1 << 14
"""Entries sampled to bracket the k-th largest score of a large layer before selecting exactly."""


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of 1-D `values` (1 <= k <= numel), exactly, without a full sort.

    Large inputs: quantiles of a strided sample bracket the answer, and the exact selection runs
    only over the entries inside the bracket; when the bracket misses, over all of them.
    """
    n = values.numel()
    if n <= 8 * SELECT_SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: n // SELECT_SAMPLE].contiguous()
    m = sample.numel()
    q = (n - k + 1) / n  # the answer's quantile
    at, margin = q * m, 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo = torch.kthvalue(sample, max(1, int(at - margin))).values
    hi = torch.kthvalue(sample, min(m, int(at + margin) + 1)).values
    need = k - int(torch.count_nonzero(values > hi))  # rank of the answer among the values <= hi
    inside = values[(values >= lo).logical_and_(values <= hi)]
    if 0 < need <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def _top_k(
    values: torch.Tensor, k: int, favored: torch.Tensor | None, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of the k best `eligible` entries of 1-D `values`: higher value, then favored, then
    lower index (the order of `rank_groups`).

    Everything above the k-th largest value is kept; the places left go to the entries tied at it,
    in (favored, index) order.
    """
    n = values.numel()
    count = n if eligible is None else int(torch.count_nonzero(eligible))
    if k <= 0 or k >= count:
        full = torch.ones(n, dtype=torch.bool) if eligible is None else eligible.clone()
        return full if k > 0 else torch.zeros(n, dtype=torch.bool)
    v = values if eligible is None else values.masked_fill(~eligible, -math.inf)
    threshold = _kth_largest(v, k)
    if eligible is not None and threshold == -math.inf:  # eligible -inf scores: select among them only
        index = eligible.nonzero().flatten()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[index[_top_k(values[index], k, None if favored is None else favored[index])]] = True
        return keep
    keep = v >= threshold
    if int(torch.count_nonzero(keep)) == k:  # no tie to break
        return keep
    keep = v > threshold
    ties = (v == threshold).nonzero().flatten()
    if favored is not None:
        ties = ties[torch.sort((~favored[ties]).to(torch.int8), stable=True).indices]
    keep[ties[: k - int(torch.count_nonzero(keep))]] = True
    return keep


def make_group_mask(
    group_scores: torch.Tensor,
    sparsity: float,
    favored: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the best (1 - sparsity) share of groups; same shape as `group_scores`.

    The same groups as the first `n_keep` of `rank_groups`, found by selection (O(n)), not sorting.
    """
    flat = group_scores.flatten()
    n = flat.numel()
    n_keep = n - num_pruned(n, sparsity)
    if math.isnan(float(flat.sum())) and bool(flat.isnan().any()):  # NaN ranks first, as in a sort
        keep = torch.zeros(n, dtype=torch.bool)
        keep[rank_groups(group_scores, favored, allowed)[:n_keep]] = True
        return keep.reshape(group_scores.shape)
    fav = None if favored is None else favored.flatten()
    if allowed is None:
        return _top_k(flat, n_keep, fav).reshape(group_scores.shape)
    allow = allowed.flatten()
    n_allowed = int(torch.count_nonzero(allow))
    if n_keep <= n_allowed:  # only allowed groups survive
        keep = _top_k(flat, n_keep, fav, allow)
    else:  # every allowed group survives; the others compete for the places left
        keep = _top_k(flat, n_keep - n_allowed, fav, ~allow).logical_or_(allow)
    return keep.reshape(group_scores.shape)


def make_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: str,
    *,
    favored: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    taps: int = 1,
) -> torch.Tensor:
    """Binary mask (True = keep) over a 2-D weight, keeping its highest-scoring groups.

    Args:
        scores: (out, in) float per-entry importance scores (non-negative).
        sparsity: fraction of groups to prune, in [0, 1).
        pattern: one of `PATTERNS`.
        favored: optional (out, in) bool entry mask; among equal scores these groups are kept first
            (pass the current mask so re-ranking does not flip tied groups).
        allowed: optional (out, in) bool entry mask; groups outside it are pruned first
            (pass the current mask to make a nested, monotone mask while sparsifying).
        taps: columns per input channel of a convolution weight (see the module's docstring).

    Returns:
        (out, in) bool mask with exactly `num_pruned(groups, sparsity)` groups pruned.
    """
    validate_pattern(pattern)
    validate_sparsity(sparsity)
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} and dtype {scores.dtype} must be a 2-D float tensor: "
            "reshape higher ranks with fedprune_core.masks.as_matrix first"
        )
    shape = (scores.shape[0], scores.shape[1])
    check_shape(shape, pattern, "scores")
    if taps < 1 or shape[1] % taps:
        raise ValueError(
            f"taps={taps} must be a positive divisor of the scores' {shape[1]} columns: pass the number of "
            "kernel taps per input channel (PrunableSpec.taps), or 1"
        )
    grid = group_scores(scores, pattern, taps)
    fav = None if favored is None else groups_of(favored, pattern, taps)
    allow = None if allowed is None else groups_of(allowed, pattern, taps)
    return expand_groups(make_group_mask(grid, sparsity, fav, allow), pattern, shape, taps).contiguous()


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as 2-D: dim 0 rows, the remaining dims flattened (1-D -> (n, 1))."""
    return t.reshape(t.shape[0], -1)


def as_blocks(t: torch.Tensor, splits: int) -> list[torch.Tensor]:
    """2-D views of a parameter stacked along dim 0 (fused q, k, v: splits=3)."""
    return list(as_matrix(t).chunk(splits, dim=0))

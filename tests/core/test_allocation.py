"""Per-layer sparsity (Lin et al. 2022, Sec. 2.4): uniform and adaptive, exact by hand and as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune_core.allocation import adaptive, uniform
from fedprune_core.prunable import PrunableSpec


def _specs(*shapes: tuple[int, int]) -> dict[str, PrunableSpec]:
    return {f"l{i}": PrunableSpec(f"l{i}", shape, 1, True, "column") for i, shape in enumerate(shapes)}


def _weighted_mean(alloc: dict[str, float], specs: dict[str, PrunableSpec]) -> float:
    return sum(alloc[n] * s.numel for n, s in specs.items()) / sum(s.numel for s in specs.values())


def test_uniform_gives_every_layer_the_target() -> None:
    assert uniform(_specs((2, 2), (3, 5)), 0.3) == {"l0": 0.3, "l1": 0.3}


def test_adaptive_by_hand() -> None:
    # equal sizes, importance 1 and 3: mean 2, ratios 2 and 2/3; s = c * ratio with
    # (2c + 2c/3) / 2 = 0.4 -> c = 0.3 -> s = [0.6, 0.2]: the less important layer is pruned more.
    specs = _specs((2, 2), (2, 2))
    scores = {"l0": torch.full((2, 2), 1.0), "l1": torch.tensor([[3.0, 3.0], [6.0, 0.0]])}
    alloc = adaptive(scores, specs, 0.4)
    assert alloc == pytest.approx({"l0": 0.6, "l1": 0.2}, abs=1e-12)


def test_adaptive_weights_the_mean_by_layer_size() -> None:
    # sizes 1 and 3, importance 1 and 2: weighted mean importance 7/4, ratios 7/4 and 7/8;
    # (7c/4 + 3 * 7c/8) / 4 = 0.5 -> c = 16/35 -> s = [0.8, 0.4]
    specs = _specs((1, 1), (1, 3))
    scores = {"l0": torch.tensor([[1.0]]), "l1": torch.full((1, 3), 2.0)}
    assert adaptive(scores, specs, 0.5) == pytest.approx({"l0": 0.8, "l1": 0.4}, abs=1e-12)


def test_adaptive_clips_to_the_bounds_and_rebalances() -> None:
    # unclipped [0.6, 0.2] (see above) with max 0.5: l0 = 0.5, so l1 = 0.3 keeps the mean 0.4
    specs = _specs((2, 2), (2, 2))
    scores = {"l0": torch.full((2, 2), 1.0), "l1": torch.full((2, 2), 3.0)}
    assert adaptive(scores, specs, 0.4, max_sparsity=0.5) == pytest.approx({"l0": 0.5, "l1": 0.3}, abs=1e-12)
    assert adaptive(scores, specs, 0.4, min_sparsity=0.3) == pytest.approx({"l0": 0.5, "l1": 0.3}, abs=1e-12)


def test_adaptive_zero_target_and_equal_importance() -> None:
    specs = _specs((2, 2), (4, 4))
    scores = {"l0": torch.full((2, 2), 2.0), "l1": torch.full((4, 4), 2.0)}
    assert adaptive(scores, specs, 0.0) == {"l0": 0.0, "l1": 0.0}
    assert adaptive(scores, specs, 0.3) == pytest.approx({"l0": 0.3, "l1": 0.3}, abs=1e-12)


def test_adaptive_without_any_importance_falls_back_to_uniform() -> None:
    # e.g. gradient scores before any client trained: every layer scores 0
    specs = _specs((2, 2), (4, 4))
    scores = {"l0": torch.zeros(2, 2), "l1": torch.zeros(4, 4)}
    assert adaptive(scores, specs, 0.3) == pytest.approx({"l0": 0.3, "l1": 0.3}, abs=1e-12)


def test_adaptive_layer_without_importance_gets_the_maximum() -> None:
    specs = _specs((2, 2), (2, 2), (2, 2))
    scores = {"l0": torch.zeros(2, 2), "l1": torch.ones(2, 2), "l2": torch.ones(2, 2)}
    alloc = adaptive(scores, specs, 0.4, max_sparsity=0.6)
    assert alloc["l0"] == pytest.approx(0.6) and alloc["l1"] == pytest.approx(0.3)
    # a low target is still met exactly: the unimportant layer takes nearly all of it
    alloc = adaptive({"l0": torch.zeros(1, 1), "l1": torch.ones(1, 1)}, _specs((1, 1), (1, 1)), 0.25)
    assert alloc["l0"] + alloc["l1"] == pytest.approx(0.5, abs=1e-9) and alloc["l1"] < 1e-9


@pytest.mark.parametrize(("low", "high", "target", "fragment"), [
    (0.5, 0.9, 0.4, "min_sparsity=0.5"),
    (0.0, 0.3, 0.4, "max_sparsity=0.3"),
    (0.0, 1.0, 0.4, "max < 1"),
])  # fmt: skip
def test_bad_bounds_name_the_values_and_the_fix(
    low: float, high: float, target: float, fragment: str
) -> None:
    specs = _specs((2, 2))
    with pytest.raises(ValueError) as err:
        adaptive({"l0": torch.ones(2, 2)}, specs, target, low, high)
    assert fragment in str(err.value) and "widen the bounds" in str(err.value)


def test_bad_target_is_rejected_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"sparsity=1\.0 must be a fraction in \[0, 1\)"):
        uniform(_specs((2, 2)), 1.0)
    with pytest.raises(ValueError, match=r"sparsity=-0\.5"):
        adaptive({}, _specs((2, 2)), -0.5)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.floats(0.0, 10.0)), min_size=1, max_size=8),
    st.floats(0.0, 0.85),
    st.floats(0.0, 1.0),
)
def test_adaptive_properties(layers: list[tuple[int, float]], target: float, low_frac: float) -> None:
    specs = _specs(*[(1, size) for size, _ in layers])
    scores = {f"l{i}": torch.full((1, size), imp) for i, (size, imp) in enumerate(layers)}
    low, high = target * low_frac, 0.9
    alloc = adaptive(scores, specs, target, low, high)
    assert _weighted_mean(alloc, specs) == pytest.approx(target, abs=1e-9)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in alloc.values())
    order = sorted(range(len(layers)), key=lambda i: layers[i][1])
    sparsities = [alloc[f"l{i}"] for i in order]  # by increasing importance
    assert all(a >= b - 1e-12 for a, b in zip(sparsities, sparsities[1:], strict=False))

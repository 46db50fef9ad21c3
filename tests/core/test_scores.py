"""Importance scores (Lin et al. 2022, Sec. 2.3): every source and norm by hand, pruned entries keep
their last score, and its consequence for refinement: weight scores let pruned entries return,
gradient-based scores (squared-gradient ones included) never do."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune_core.config import PruningConfig
from fedprune_core.masks import PATTERNS, make_mask
from fedprune_core.scores import SCORE_SOURCES, update_scores, validate_score

WEIGHT = torch.tensor([1.0, -2.0, 0.5])
GRAD = torch.tensor([0.5, 3.0, -2.0])
MOMENTUM = torch.tensor([-1.0, 0.25, 0.0])
GRAD_SQ = torch.tensor([4.0, 0.25, 9.0])  # sqrt: [2, 0.5, 3]
ALL = torch.ones(3, dtype=torch.bool)

# weight x gradient = [0.5, -6, -1]
FIRST_ROUND = {
    ("weight", "l1"): [1.0, 2.0, 0.5],
    ("weight", "l2"): [1.0, 4.0, 0.25],
    ("gradient", "l1"): [0.5, 3.0, 2.0],
    ("gradient", "l2"): [0.25, 9.0, 4.0],
    ("momentum", "l1"): [1.0, 0.25, 0.0],
    ("momentum", "l2"): [1.0, 0.0625, 0.0],
    ("weight_x_gradient", "l1"): [0.5, 6.0, 1.0],
    ("weight_x_gradient", "l2"): [0.25, 36.0, 1.0],
    ("grad_sq", "l1"): [2.0, 0.5, 3.0],  # sqrt(grad_sq)
    ("grad_sq", "l2"): [4.0, 0.25, 9.0],  # grad_sq
    ("weight_x_grad_sq", "l1"): [2.0, 1.0, 1.5],  # |w| sqrt(grad_sq)
    ("weight_x_grad_sq", "l2"): [4.0, 1.0, 2.25],  # w**2 grad_sq
}


@pytest.mark.parametrize(("source", "norm"), list(FIRST_ROUND))
def test_first_round_scores_by_hand(source: str, norm: str) -> None:
    scores = update_scores(None, source, norm, WEIGHT, GRAD, MOMENTUM, ALL, GRAD_SQ)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.tensor(FIRST_ROUND[(source, norm)]))


@pytest.mark.parametrize(("source", "norm"), list(FIRST_ROUND))
def test_pruned_entries_keep_their_last_score(source: str, norm: str) -> None:
    previous = torch.tensor([10.0, 20.0, 30.0])
    trained = torch.tensor([True, False, True])
    scores = update_scores(previous, source, norm, WEIGHT, GRAD, MOMENTUM, trained, GRAD_SQ)
    fresh = torch.tensor(FIRST_ROUND[(source, norm)])
    if source == "weight":  # the current weight's norm where trained
        expected = torch.tensor([fresh[0], 20.0, fresh[2]])
    else:  # gradient-based: accumulated where trained
        expected = torch.tensor([10.0 + fresh[0], 20.0, 30.0 + fresh[2]])
    assert torch.equal(scores, expected)


@pytest.mark.parametrize(("source", "norm", "fragment"), [
    ("hessian", "l2", "score_source='hessian'"),
    ("weight", "linf", "score_norm='linf'"),
])  # fmt: skip
def test_unknown_source_or_norm_names_the_value_and_the_choices(
    source: str, norm: str, fragment: str
) -> None:
    with pytest.raises(ValueError) as err:
        validate_score(source, norm)
    assert fragment in str(err.value) and "use one of" in str(err.value)


@pytest.mark.parametrize("source", ["grad_sq", "weight_x_grad_sq"])
def test_squared_gradient_sources_are_valid_pruning_settings(source: str) -> None:
    assert PruningConfig(score_source=source).score_source == source
    with pytest.raises(ValueError, match=r"score_source='grad_squared' is not known: use one of .*grad_sq"):
        PruningConfig(score_source="grad_squared")


def test_weight_scores_bring_a_pruned_entry_back() -> None:
    # Entry 0 is pruned; the server keeps its weight 1.0 while the kept weights shrink below it.
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scores = update_scores(None, "weight", "l1", weight, weight, weight, torch.ones(1, 4, dtype=torch.bool))
    mask = make_mask(scores, 0.25, "unstructured")
    assert mask.tolist() == [[False, True, True, True]]
    trained_weight = torch.tensor([[1.0, 0.5, 3.0, 4.0]])  # entry 1 decayed during training
    scores = update_scores(scores, "weight", "l1", trained_weight, weight, weight, mask)
    assert make_mask(scores, 0.25, "unstructured", favored=mask).tolist() == [[True, False, True, True]]


GRADIENT_SOURCES = ["gradient", "momentum", "weight_x_gradient", "grad_sq", "weight_x_grad_sq"]


@pytest.mark.parametrize("source", GRADIENT_SOURCES)
def test_gradient_scores_never_bring_a_pruned_entry_back_by_hand(source: str) -> None:
    ones = torch.ones(1, 4, dtype=torch.bool)
    signal = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scores = update_scores(None, source, "l1", signal, signal, signal, ones, signal)
    mask = make_mask(scores, 0.25, "unstructured")
    assert mask.tolist() == [[False, True, True, True]]
    # however large the pruned entry's signal would be, it is not trained, so it adds nothing
    big = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    scores = update_scores(scores, source, "l1", big, big, big, mask, big)
    assert make_mask(scores, 0.25, "unstructured", favored=mask).tolist() == mask.tolist()


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(GRADIENT_SOURCES),
    st.sampled_from(["l1", "l2"]),
    st.sampled_from(PATTERNS),
    st.floats(0.05, 0.9),
    st.integers(0, 2**16),
)
def test_gradient_scores_never_bring_a_pruned_entry_back(
    source: str, norm: str, pattern: str, sparsity: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (4, 6)

    def draw() -> torch.Tensor:
        # sparse signals with exact zeros, so that ties happen
        return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.7)

    ones = torch.ones(shape, dtype=torch.bool)
    scores = update_scores(None, source, norm, draw(), draw(), draw(), ones, draw().square())
    mask = make_mask(scores, sparsity, pattern)
    for _ in range(5):  # refinement: re-rank every round at fixed sparsity
        scores = update_scores(scores, source, norm, draw(), draw(), draw(), mask, draw().square())
        new = make_mask(scores, sparsity, pattern, favored=mask)
        assert torch.equal(new, mask)


def test_every_source_is_listed() -> None:
    assert set(SCORE_SOURCES) == {"weight", *GRADIENT_SOURCES}

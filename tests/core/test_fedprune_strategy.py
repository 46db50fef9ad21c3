"""FedPrune's masks across the phases: nested while sparsifying, re-ranked while refining (weight
scores let pruned entries return, gradient scores never do), frozen while fine-tuning."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedprune_core.allocation import adaptive
from fedprune_core.config import ExperimentConfig, PruningConfig
from fedprune_core.engine import ServerState
from fedprune_core.masks import groups_of, num_pruned
from fedprune_core.prunable import find_prunable, matrices
from fedprune_core.schedule import ScheduleConfig, phase_at, sparsity_at
from fedprune_core.strategies import make_strategy
from fedprune_core.strategies.fedprune import FedPrune
from fedprune_core.types import MaskDict, StateDict

SCHEDULE = ScheduleConfig(num_rounds=12, sparsify_rounds=4, ramp="linear", refine_rounds=4, refine_every=1)


def _model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _strategy(model: nn.Module, schedule: ScheduleConfig = SCHEDULE, **pruning: object) -> FedPrune:
    p = PruningConfig(**{"sparsity": 0.5, "pattern": "column", "allocation": "uniform", **pruning})  # type: ignore[arg-type]
    return FedPrune(find_prunable(model, p.prunable, p.pattern, p.include_1d), p, schedule)


Train = Callable[[int, StateDict, MaskDict], StateDict]


def _noise_training(seed: int, scale: float = 0.1) -> Train:
    """Stand-in for a round of FedAvg: a seeded random step on the trained (kept) coordinates."""

    def train(round_num: int, weights: StateDict, masks: MaskDict) -> StateDict:
        g = torch.Generator().manual_seed(seed * 1000 + round_num)
        new = {}
        for name, w in weights.items():
            step = torch.randn(w.shape, generator=g) * scale
            new[name] = w - step * masks[name] if name in masks else w - step
        return new

    return train


def _run(strategy: FedPrune, weights: StateDict, train: Train, rounds: int) -> list[ServerState]:
    """Score, mask, train and observe like `engine.aggregate`, without clients."""
    state = ServerState(0, weights)
    states = []
    for r in range(1, rounds + 1):
        scores = strategy.score(state, r)
        masks = strategy.mask(state, scores, r)
        new = train(r, state.weights, masks)
        trained = {n: masks.get(n, torch.ones_like(w, dtype=torch.bool)) for n, w in new.items()}
        grads = {n: torch.where(trained[n], state.weights[n] - new[n], torch.zeros_like(new[n])) for n in new}
        extra = strategy.observe(state, masks, grads, trained, None)
        state = ServerState(r, new, masks, scores, {}, extra)
        states.append(state)
    return states


def _weights(model: nn.Module) -> StateDict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _layer_sparsity(mask: torch.Tensor) -> float:
    return float((~mask).float().mean())


# --- sparsify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "row", "column", "half_row", "half_column"])
@pytest.mark.parametrize("source", ["weight", "gradient"])
def test_sparsify_ramps_with_nested_masks(pattern: str, source: str) -> None:
    model = _model()
    strategy = _strategy(model, pattern=pattern, score_source=source)
    states = _run(strategy, _weights(model), _noise_training(1), SCHEDULE.sparsify_rounds)
    previous: MaskDict = {}
    for r, state in enumerate(states, start=1):
        # gradient scores: round 1 trains dense, since there is no gradient yet
        target = 0.0 if source == "gradient" and r == 1 else sparsity_at(r, SCHEDULE, 0.5)
        for name, mask in state.masks.items():
            groups = groups_of(mask, pattern)
            assert int((~groups).sum()) == num_pruned(groups.numel(), target)
            if previous:
                assert not (mask & ~previous[name]).any(), f"round {r}: a pruned entry of {name} came back"
        previous = state.masks


# --- refine ------------------------------------------------------------------------------------


def _after_sparsify(source: str) -> tuple[FedPrune, ServerState]:
    model = _model()
    strategy = _strategy(model, pattern="column", score_source=source)
    states = _run(strategy, _weights(model), _noise_training(2), SCHEDULE.sparsify_rounds)
    return strategy, states[-1]


def test_refine_with_weight_scores_brings_a_pruned_column_back() -> None:
    strategy, state = _after_sparsify("weight")
    r = SCHEDULE.sparsify_rounds + 1
    assert phase_at(r, SCHEDULE) == "refine"
    # clients shrank every kept weight; the server kept the pruned ones as they were
    shrunk = {
        n: w * state.masks[n] * 0.01 + w * ~state.masks[n] if n in state.masks else w
        for n, w in state.weights.items()
    }
    state = ServerState(state.round_num, shrunk, state.masks, state.scores)
    masks = strategy.mask(state, strategy.score(state, r), r)
    for name, mask in masks.items():
        assert (mask & ~state.masks[name]).any(), f"no pruned column of {name} returned"
        assert _layer_sparsity(mask) == _layer_sparsity(state.masks[name])  # S fixed


def test_refine_with_weight_scores_brings_pruned_entries_back_while_training() -> None:
    model = _model()
    strategy = _strategy(model, pattern="unstructured")
    states = _run(strategy, _weights(model), _noise_training(3, scale=0.5), 8)
    returned = sum(
        int((s.masks[n] & ~p.masks[n]).sum())
        for p, s in zip(states[3:], states[4:], strict=False)
        for n in s.masks
    )
    assert returned > 0


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["gradient", "momentum", "weight_x_gradient"]),
    st.sampled_from(["l1", "l2"]),
    st.sampled_from(["unstructured", "column", "half_row"]),
    st.integers(0, 2**16),
)
def test_refine_with_gradient_scores_never_brings_a_pruned_entry_back(
    source: str, norm: str, pattern: str, seed: int
) -> None:
    model = _model(seed)
    strategy = _strategy(model, pattern=pattern, score_source=source, score_norm=norm)
    states = _run(strategy, _weights(model), _noise_training(seed, scale=0.5), 8)
    for before, after in zip(states[3:], states[4:], strict=False):  # rounds 4 -> 5 ... 7 -> 8
        assert phase_at(after.round_num, SCHEDULE) == "refine"
        for name in after.masks:
            assert torch.equal(after.masks[name], before.masks[name])


def test_refine_with_gradient_scores_and_adaptive_allocation_only_moves_whole_layers() -> None:
    # adaptive re-divides S among layers at each re-ranking; within a layer the masks stay nested
    model = _model(4)
    strategy = _strategy(
        model, pattern="unstructured", score_source="gradient", allocation="adaptive", max_layer_sparsity=0.8
    )
    states = _run(strategy, _weights(model), _noise_training(4, scale=0.5), 8)
    for before, after in zip(states[3:], states[4:], strict=False):
        for name in after.masks:
            a, b = after.masks[name], before.masks[name]
            assert not (a & ~b).any() or not (b & ~a).any()


# --- fine-tune ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["weight", "gradient"])
def test_finetune_freezes_masks_and_scores(source: str) -> None:
    model = _model()
    strategy = _strategy(model, pattern="row", score_source=source)
    states = _run(strategy, _weights(model), _noise_training(5, scale=0.5), SCHEDULE.num_rounds)
    frozen = states[SCHEDULE.sparsify_rounds + SCHEDULE.refine_rounds - 1]
    for state in states[SCHEDULE.sparsify_rounds + SCHEDULE.refine_rounds :]:
        assert phase_at(state.round_num, SCHEDULE) == "finetune"
        assert state.masks is frozen.masks and state.scores is frozen.scores


# --- warm-up of gradient scores ----------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_gradient_scores_make_the_first_masks_from_round_1_gradients_even_in_finetune(
    allocation: str,
) -> None:
    # sparsify_rounds=1, refine_rounds=0: round 2, which makes the first masks, is a fine-tune round
    schedule = ScheduleConfig(num_rounds=3, sparsify_rounds=1, refine_rounds=0)
    model = _model()
    strategy = _strategy(model, schedule, score_source="gradient", allocation=allocation, pattern="column")

    def train(round_num: int, weights: StateDict, masks: MaskDict) -> StateDict:
        # round 1 moves only the last column of each weight: those columns must be kept
        return {
            n: w - (torch.arange(w.shape[-1]) == w.shape[-1] - 1) * 1.0 if w.dim() == 2 else w
            for n, w in weights.items()
        }

    states = _run(strategy, _weights(model), train, 3)
    assert all(m.all() for m in states[0].masks.values())  # round 1: dense
    for mask in states[1].masks.values():
        assert mask[0].tolist()[-1] is True and _layer_sparsity(mask) > 0
    assert states[2].masks is states[1].masks


# --- fused attention ---------------------------------------------------------------------------


def test_fused_in_proj_is_masked_per_q_k_v_block() -> None:
    attn = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2)})
    one_shot = ScheduleConfig(num_rounds=2, sparsify_rounds=1, ramp="one_shot", refine_rounds=0)
    strategy = _strategy(
        attn,
        one_shot,
        pattern="column",
        sparsity=0.75,
        prunable=("attn.in_proj_weight", "attn.out_proj.weight"),
    )
    spec = strategy.specs["attn.in_proj_weight"]
    assert spec.splits == 3
    # q scores high on column 0, k on column 1, v on column 2; keep 1 of 4 columns per block
    w = torch.full((12, 4), 0.1)
    for i in range(3):
        w[4 * i : 4 * i + 4, i] = 1.0
    state = ServerState(0, {"attn.in_proj_weight": w, "attn.out_proj.weight": torch.ones(4, 4)})
    masks = strategy.mask(state, strategy.score(state, 1), 1)
    q, k, v = matrices(masks["attn.in_proj_weight"], spec)
    assert q[0].tolist() == [True, False, False, False]
    assert k[0].tolist() == [False, True, False, False]
    assert v[0].tolist() == [False, False, True, False]
    for block in (q, k, v):
        assert _layer_sparsity(block) == 0.75  # each block has its own exact sparsity
        assert torch.equal(block, block[:1].expand(4, 4))  # whole columns


# --- adaptive allocation -----------------------------------------------------------------------


def test_adaptive_realizes_each_layer_target_within_one_group_and_the_mean_is_s() -> None:
    important = nn.Linear(12, 10)
    with torch.no_grad():
        important.weight.mul_(10.0)  # the most important layer: least sparsity
    model = nn.Sequential(nn.Linear(16, 12), important, nn.Linear(10, 8))
    strategy = _strategy(
        model,
        ScheduleConfig(num_rounds=2, sparsify_rounds=1, ramp="one_shot", refine_rounds=0),
        allocation="adaptive",
        sparsity=0.4,
    )
    state = ServerState(0, _weights(model))
    scores = strategy.score(state, 1)
    targets = adaptive(scores, strategy.specs, 0.4, 0.0, strategy.pruning.max_layer_sparsity)
    sizes = {n: s.numel for n, s in strategy.specs.items()}
    assert sum(targets[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.4)
    assert targets["1.weight"] == min(targets.values())
    masks = strategy.mask(state, scores, 1)
    for name, mask in masks.items():
        columns = mask.shape[1]
        assert abs(_layer_sparsity(mask) - targets[name]) < 1.0 / columns


def test_built_from_an_experiment_config() -> None:
    config = ExperimentConfig.from_dict({"pruning": {"prunable": ["0.weight"], "pattern": "row"}})
    strategy = make_strategy(config, _model())
    assert isinstance(strategy, FedPrune)
    assert list(strategy.specs) == ["0.weight"] and strategy.specs["0.weight"].pattern == "row"

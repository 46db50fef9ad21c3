"""The three phases (Lin et al. 2022, Sec. 2.1): phase_at and sparsity_at are pure functions of the round."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune_core.schedule import RAMPS, ScheduleConfig, masks_change_at, phase_at, phase_spans, sparsity_at

SCHEDULE = ScheduleConfig(num_rounds=12, sparsify_rounds=4, ramp="linear", refine_rounds=4, refine_every=2)


def test_phase_boundaries() -> None:
    phases = [phase_at(r, SCHEDULE) for r in range(1, 13)]
    assert phases == ["sparsify"] * 4 + ["refine"] * 4 + ["finetune"] * 4


def test_no_refine_goes_straight_to_finetune() -> None:
    s = ScheduleConfig(num_rounds=3, sparsify_rounds=2, refine_rounds=0)
    assert [phase_at(r, s) for r in (1, 2, 3)] == ["sparsify", "sparsify", "finetune"]


@pytest.mark.parametrize(("ramp", "expected"), [
    ("one_shot", [0.0, 0.8, 0.8, 0.8, 0.8, 0.8]),
    ("linear", [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]),
    # 0.8 * (1 - (1 - t)^3), t = r/4: 1 - 27/64 = 37/64, 1 - 1/8 = 7/8, 1 - 1/64 = 63/64
    ("cubic", [0.0, 0.8 * 37 / 64, 0.8 * 7 / 8, 0.8 * 63 / 64, 0.8, 0.8]),
    # ramp_steps=2: half the target for the first half of the rounds
    ("step", [0.0, 0.4, 0.4, 0.8, 0.8, 0.8]),
])  # fmt: skip
def test_ramps_by_hand(ramp: str, expected: list[float]) -> None:
    s = ScheduleConfig(num_rounds=8, sparsify_rounds=4, ramp=ramp, ramp_steps=2, refine_rounds=2)
    assert [sparsity_at(r, s, 0.8) for r in range(6)] == pytest.approx(expected, abs=1e-12)


def test_step_ramp_with_as_many_steps_as_rounds_is_linear() -> None:
    s = ScheduleConfig(num_rounds=10, sparsify_rounds=5, ramp="step", ramp_steps=5, refine_rounds=0)
    assert [sparsity_at(r, s, 0.5) for r in range(1, 6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_masks_change_when_sparsity_moves_and_every_n_refine_rounds() -> None:
    s = ScheduleConfig(
        num_rounds=14, sparsify_rounds=4, ramp="step", ramp_steps=2, refine_rounds=6, refine_every=3
    )
    changes = [r for r in range(1, 15) if masks_change_at(r, s, 0.5)]
    # sparsify: round 1, and round 3 where the step ramp moves; refine rounds 5..10 re-rank at 7 and 10
    assert changes == [1, 3, 7, 10]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(0, 20),
    st.integers(0, 20),
    st.sampled_from(RAMPS),
    st.integers(1, 5),
    st.floats(0.0, 0.99),
    st.lists(st.integers(-2, 70), min_size=1, max_size=10),
)
def test_schedule_is_pure_monotone_and_reaches_the_target(
    sparsify: int, refine: int, finetune: int, ramp: str, steps: int, target: float, rounds: list[int]
) -> None:
    s = ScheduleConfig(sparsify + refine + finetune, sparsify, ramp, steps, refine, 1)
    first = [(phase_at(r, s), sparsity_at(r, s, target)) for r in rounds]
    for r in reversed(rounds):  # calls in any order give the same answers
        assert (phase_at(r, s), sparsity_at(r, s, target)) == first[rounds.index(r)]
    curve = [sparsity_at(r, s, target) for r in range(0, s.num_rounds + 2)]
    assert curve[0] == 0.0
    assert all(a <= b + 1e-15 for a, b in zip(curve, curve[1:], strict=False))
    assert all(c == pytest.approx(target) for c in curve[sparsify:])
    assert all(not masks_change_at(r, s, target) for r in range(sparsify + refine + 1, s.num_rounds + 1))


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"num_rounds": 0}, ["num_rounds=0", "> 0"]),
    ({"ramp": "exponential"}, ["ramp='exponential'", "one_shot, linear, cubic, step"]),
    ({"sparsify_rounds": 0}, ["sparsify_rounds=0", ">= 1"]),
    ({"refine_every": 0}, ["refine_every=0"]),
    ({"ramp_steps": 0}, ["ramp_steps=0"]),
    ({"refine_rounds": -1}, ["refine_rounds=-1", "pass 0 to skip"]),
    ({"num_rounds": 10, "sparsify_rounds": 6, "refine_rounds": 5},
     ["sparsify_rounds=6", "refine_rounds=5", "num_rounds=10", "raise num_rounds or shorten a phase"]),
])  # fmt: skip
def test_bad_schedule_names_the_value_the_rule_and_the_fix(
    kwargs: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as err:
        ScheduleConfig(**kwargs)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(err.value)


def test_phases_that_exactly_fill_the_rounds_are_fine() -> None:
    s = ScheduleConfig(num_rounds=10, sparsify_rounds=6, refine_rounds=4)
    assert phase_at(10, s) == "refine" and phase_at(11, s) == "finetune"


def test_bad_target_sparsity_is_rejected() -> None:
    with pytest.raises(ValueError, match="sparsity=1.5"):
        sparsity_at(1, SCHEDULE, 1.5)


def test_phase_spans_name_each_phase_with_rounds_and_skip_empty_ones() -> None:
    assert phase_spans(ScheduleConfig(8, 3, "linear", 4, 3, 1)) == [("sparsify", 1, 3), ("refine", 4, 6),
                                                                   ("finetune", 7, 8)]
    assert phase_spans(ScheduleConfig(5, 2, "linear", 4, 0, 1)) == [("sparsify", 1, 2), ("finetune", 3, 5)]
    assert phase_spans(ScheduleConfig(6, 3, "linear", 4, 3, 1)) == [("sparsify", 1, 3), ("refine", 4, 6)]
    config = ScheduleConfig(30, 7, "cubic", 4, 11, 2)
    assert all(phase_at(r, config) == name for name, a, b in phase_spans(config) for r in range(a, b + 1))

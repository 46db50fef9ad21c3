"""The three phases of Federated Pruning (Lin et al. 2022, Sec. 2.1) as pure functions of the round.

Rounds are numbered from 1; round 0 is the initial model.

- sparsify, rounds 1..T_s: sparsity ramps 0 -> S. `one_shot` jumps to S at round 1;
  `linear`, `cubic` (Zhu & Gupta 2017: s_t = S + (0 - S)(1 - t/T_s)^3) and `step` (ramp_steps equal
  steps) reach S at round T_s. Masks are nested while sparsifying: an entry once pruned stays pruned.
- refine, the next T_r rounds: S fixed; every `refine_every` rounds masks are re-ranked from the
  scores of all coordinates, so pruned weights the server kept can return.
- finetune, the rest: masks frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedprune_core.masks import validate_sparsity

RAMPS: tuple[str, ...] = ("one_shot", "linear", "cubic", "step")
PHASES: tuple[str, ...] = ("sparsify", "refine", "finetune")


@dataclass(frozen=True)
class ScheduleConfig:
    """Round budget of each phase.

    Attributes:
        num_rounds: total rounds (> 0).
        sparsify_rounds: rounds of the sparsify phase (>= 1).
        ramp: one of `RAMPS`.
        ramp_steps: number of equal steps for the `step` ramp.
        refine_rounds: rounds of the refine phase (>= 0).
        refine_every: re-rank masks every this many refine rounds (>= 1).
    """

    num_rounds: int = 60
    sparsify_rounds: int = 20
    ramp: str = "cubic"
    ramp_steps: int = 4
    refine_rounds: int = 20
    refine_every: int = 5

    def __post_init__(self) -> None:
        if self.num_rounds <= 0:
            raise ValueError(f"num_rounds={self.num_rounds} must be > 0: pass e.g. 100")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp={self.ramp!r} is not known: use one of {', '.join(RAMPS)}")
        for name in ("sparsify_rounds", "ramp_steps", "refine_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1: pass e.g. 1")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds={self.refine_rounds} must be >= 0: pass 0 to skip refinement")
        if self.sparsify_rounds + self.refine_rounds > self.num_rounds:
            raise ValueError(
                f"sparsify_rounds={self.sparsify_rounds} + refine_rounds={self.refine_rounds} exceed "
                f"num_rounds={self.num_rounds}: the phases must fit; raise num_rounds or shorten a phase"
            )


def phase_at(round_num: int, schedule: ScheduleConfig) -> str:
    """Phase of round `round_num` (1-based)."""
    if round_num <= schedule.sparsify_rounds:
        return "sparsify"
    if round_num <= schedule.sparsify_rounds + schedule.refine_rounds:
        return "refine"
    return "finetune"


def sparsity_at(round_num: int, schedule: ScheduleConfig, target: float) -> float:
    """Target overall sparsity in round `round_num`; 0 at round 0, `target` from T_s on."""
    validate_sparsity(target)
    t = min(max(round_num, 0), schedule.sparsify_rounds) / schedule.sparsify_rounds
    if round_num <= 0:
        return 0.0
    if schedule.ramp == "one_shot":
        return target
    if schedule.ramp == "linear":
        return target * t
    if schedule.ramp == "cubic":
        return target * (1.0 - (1.0 - t) ** 3)
    return target * math.ceil(t * schedule.ramp_steps - 1e-9) / schedule.ramp_steps


def masks_change_at(round_num: int, schedule: ScheduleConfig, target: float) -> bool:
    """Whether the server recomputes masks at the start of `round_num`."""
    phase = phase_at(round_num, schedule)
    if phase == "sparsify":
        return round_num == 1 or sparsity_at(round_num, schedule, target) != sparsity_at(
            round_num - 1, schedule, target
        )
    if phase == "refine":
        return (round_num - schedule.sparsify_rounds) % schedule.refine_every == 0
    return False


def phase_spans(schedule: ScheduleConfig) -> list[tuple[str, int, int]]:
    """Each phase that has rounds, with its first and last round, in order.

    Example: ``num_rounds=8, sparsify_rounds=3, refine_rounds=3`` gives
    ``[("sparsify", 1, 3), ("refine", 4, 6), ("finetune", 7, 8)]``.
    """
    ends = (schedule.sparsify_rounds, schedule.sparsify_rounds + schedule.refine_rounds, schedule.num_rounds)
    spans, first = [], 1
    for phase, last in zip(PHASES, ends, strict=True):
        if last >= first:
            spans.append((phase, first, last))
        first = max(first, last + 1)
    return spans

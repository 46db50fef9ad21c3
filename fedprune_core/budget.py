"""What a method costs a client: FLOPs of a training step against dense, and what it took to reach a target.

FLOPs are counted, not modelled: `torch.utils.flop_counter.FlopCounterMode` records the matrix
products and convolutions a training step really dispatches (2 FLOPs per multiply-accumulate,
forward and backward; elementwise work such as masking and the optimizer is not counted). So a
mask held as zeros in a dense tensor (FedPrune's masked layers, PruneFL) saves nothing, because
the dense product still runs on dense hardware; a sub-model whose tensors are physically smaller
(sliced `nn.Linear` blocks, Federated Dropout's sub-models) saves what its shapes save.

Time and bytes to a target (PruneFL's own claim, Jiang et al., IEEE TNNLS 2022: time to a target
accuracy): the first evaluated round whose metric reached the target, with the clients' time and
traffic summed up to that round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

LOWER_IS_BETTER: dict[str, bool] = {"eval_wer": True, "eval_cer": True, "eval_loss": True, "eval_accuracy": False}
"""The evaluation metrics a target can be set on, and whether reaching the target means falling to it."""
MODELLED = "modelled_round_time_s"
"""The per-round metric of a strategy with a round-time model (PruneFL)."""
TARGET_METRICS: tuple[str, ...] = ("eval_wer", "eval_accuracy")
"""The metric a run's `target` applies to: the first of these the workload reports (WER, else accuracy)."""


def step_flops(run_step: Callable[[], Any]) -> int:
    """FLOPs that `run_step()` dispatches (matrix products and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        run_step()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Reached:
    """Where a run first reached its target.

    Attributes:
        round_num: the first evaluated round whose metric reached the target.
        client_time_s: the sum over rounds 1..round_num of each round's slowest client (`client_time_s_max`):
            the clients' training time of the rounds, clients of a round running in parallel.
        client_bytes: every client's download and upload summed over rounds 1..round_num.
        modelled_time_s: the sum of the rounds' `modelled_round_time_s` (PruneFL's time model), None
            when a round has none.
    """

    round_num: int
    client_time_s: float
    client_bytes: float
    modelled_time_s: float | None = None


def reached(history: Sequence[dict[str, float]], metric: str, target: float) -> Reached | None:
    """The first round of `history` whose `metric` reached `target` (<= it for WER, CER and loss,
    >= it for accuracy), or None when no evaluated round did.

    Args:
        history: per-round metrics in round order, each with ``round``, ``client_time_s_max``,
            ``bytes_down``, ``bytes_up`` and, in evaluated rounds, `metric`.
        metric: a key of `LOWER_IS_BETTER`.
        target: the value to reach.

    Raises:
        ValueError: `metric` is not one a target can be set on.
    """
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"metric={metric!r} takes no target: use one of {', '.join(LOWER_IS_BETTER)}")
    lower = LOWER_IS_BETTER[metric]
    time_s = traffic = 0.0
    modelled: float | None = 0.0
    for row in history:
        time_s += row["client_time_s_max"]
        traffic += row["bytes_down"] + row["bytes_up"]
        modelled = modelled + row["modelled_round_time_s"] if modelled is not None and MODELLED in row else None
        value = row.get(metric)
        if value is not None and (value <= target if lower else value >= target):
            return Reached(int(row["round"]), time_s, traffic, modelled)
    return None

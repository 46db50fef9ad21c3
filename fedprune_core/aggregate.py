"""Aggregation: masked FedAvg (McMahan et al. 2017) with an optional FedOpt server step
(Reddi et al. 2021, "Adaptive Federated Optimization").

Each coordinate is averaged over the clients that held it, weighted by their example counts;
a coordinate that no client trained keeps the server's value.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from fedprune_core.types import MaskDict, StateDict


@dataclass(frozen=True)
class ClientContribution:
    """One client's update scattered back to full shape.

    Attributes:
        values: full-shape trained values (untrained coordinates are ignored).
        held: bool masks of the coordinates the client trained, for pruned parameters; a
            parameter missing here was held whole.
        num_examples: the client's example count, its FedAvg weight.
    """

    values: StateDict
    held: MaskDict
    num_examples: int


def masked_fedavg(weights: StateDict, contributions: list[ClientContribution]) -> tuple[StateDict, MaskDict]:
    """Per-coordinate example-weighted mean over the clients that held each coordinate.

    Returns:
        (average, trained): the averaged weights (server value where no client trained) and, per
        parameter, the bool mask of coordinates at least one client trained.
    """
    if not contributions:
        raise ValueError("no client contributions to aggregate: sample at least one client per round")
    average: StateDict = {}
    trained: MaskDict = {}
    for name, w in weights.items():
        num = torch.zeros_like(w, dtype=torch.float64)
        den = torch.zeros_like(w, dtype=torch.float64)
        for c in contributions:
            held = c.held.get(name)
            weight = float(c.num_examples) if held is None else held.to(torch.float64) * c.num_examples
            num += c.values[name].to(torch.float64) * weight
            den += weight
        trained[name] = den > 0
        average[name] = torch.where(trained[name], num / den.clamp_min(1e-300), w.to(torch.float64)).to(w.dtype)
    return average, trained


def server_step(
    weights: StateDict,
    average: StateDict,
    trained: MaskDict,
    momentum: StateDict,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    averaged: Collection[str] = (),
) -> tuple[StateDict, StateDict, StateDict]:
    """FedOpt server update on the pseudo-gradient Δ = W - average.

    m <- μ m + Δ and W <- W - η m on trained coordinates; untrained ones keep W and m.
    With η = 1 and μ = 0 this is plain FedAvg (W <- average). Entries named in `averaged`
    (statistics, not weights) always take the plain average and keep their momentum.

    Returns:
        (new weights, new momentum, pseudo-gradient Δ (0 where untrained)).
    """
    new_w: StateDict = {}
    new_m: StateDict = {}
    grads: StateDict = {}
    for name, w in weights.items():
        delta = torch.where(trained[name], w - average[name], torch.zeros_like(w))
        if name in averaged or (server_lr == 1.0 and server_momentum == 0.0):
            new_w[name] = average[name]
            new_m[name] = momentum.get(name, torch.zeros_like(w))
        else:
            m_prev = momentum.get(name, torch.zeros_like(w))
            m = torch.where(trained[name], server_momentum * m_prev + delta, m_prev)
            new_w[name] = torch.where(trained[name], w - server_lr * m, w)
            new_m[name] = m
        grads[name] = delta
    return new_w, new_m, grads


def validate_server_optimizer(server_lr: float, server_momentum: float) -> None:
    """Raise a ValueError naming an out-of-range server learning rate or momentum."""
    if not server_lr > 0:
        raise ValueError(f"server_lr={server_lr} must be > 0: pass 1.0 for plain FedAvg")
    if not 0.0 <= server_momentum < 1.0:
        raise ValueError(f"server_momentum={server_momentum} must be in [0, 1): pass 0.0 for plain FedAvg")

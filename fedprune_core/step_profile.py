"""A client's training step, timed per prunable layer: the measured time model of PruneFL.

Jiang et al. (IEEE TNNLS 2022, arXiv 1909.12326) model one round's time as

    T(m) = T0 + Σ_layers kept_l · (compute_l + comm_l)

and measure the coefficients on the target device: the compute time of each layer per kept weight,
the link's time per transmitted weight, and T0, the time that does not depend on the kept weights
(the reference implementation, jiangyuang/PruneFL `configs/*.py`, multiplies a step's coefficients by
the local updates per round and sets comm = 2 · 4 bytes / bandwidth).

Here the model's layers are timed on the machine that runs the clients, on a real batch of a
client's data: one training step records the inputs of every module (forward hooks); then each
module that holds prunable parameters (or, when a parameter's own module is not called as a
module, e.g. an attention's output projection, its nearest called ancestor) runs forward and
backward alone on its recorded inputs, and its median time is split over its prunable weights.
The whole step (forward, backward, optimizer) is timed too; what the layers do not account for is
the step's fixed part. compute_l is then (seconds of layer l) / (weights of layer l): a kernel
whose cost grows with the kept weights (the paper's sparse kernels) costs that much per weight.
The masked dense tensors FedPrune trains cost the same at any density, so timing a second density
would measure nothing; the linear model is the paper's.

Timing is noisy: the profile is measured once per run and stored (`fedprune_core.strategies.prunefl`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fedprune_core.prunable import PrunableSpec


@dataclass(frozen=True)
class StepProfile:
    """Measured seconds of one training step.

    Attributes:
        step_s: a whole step (forward, backward, optimizer) of the model.
        layer_s: per prunable parameter, seconds of forward + backward per weight of that parameter
            (its timed module's seconds divided by the prunable weights the module holds).
    """

    step_s: float
    layer_s: dict[str, float]

    def fixed_s(self, specs: dict[str, PrunableSpec]) -> float:
        """The step's seconds that no prunable weight accounts for (>= 0)."""
        return max(0.0, self.step_s - sum(self.layer_s[n] * s.numel for n, s in specs.items()))


def timed_module(model: nn.Module, name: str, called: set[str]) -> str:
    """The module timed for parameter `name`: its own module if it was called, else the nearest called
    ancestor ("" for the root, also when none was called)."""
    path = name.rpartition(".")[0]
    while path and path not in called:
        path = path.rpartition(".")[0]
    return path


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record_inputs(model: nn.Module, run_step: Callable[[], Any]) -> dict[str, tuple[Any, Any]]:
    """The (args, kwargs) of the first call of every module during `run_step()`, detached."""
    inputs: dict[str, tuple[Any, Any]] = {}

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, kwargs: Any) -> None:
            if path not in inputs:
                inputs[path] = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
        return record

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True) for p, m in model.named_modules()]
    try:
        run_step()
    finally:
        for h in handles:
            h.remove()
    return inputs


def module_step(module: nn.Module, args: Any, kwargs: Any) -> Callable[[], None]:
    """Forward and backward of `module` alone on its recorded inputs (float inputs need gradients,
    as inside a network)."""
    def step() -> None:
        a, k = pytree.tree_map_only(
            torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()), (args, kwargs)
        )
        out = module(*a, **k)
        loss = sum(t.float().sum() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        module.zero_grad(set_to_none=True)
    return step


def profile_step(
    model: nn.Module,
    specs: dict[str, PrunableSpec],
    run_steps: Callable[[int], float],
    repeats: int,
) -> StepProfile:
    """Time a training step of `model` whole and per prunable layer.

    Args:
        model: the dense model, trained by `run_steps` (its weights change; pass a throwaway copy).
        specs: its prunable parameters.
        run_steps: `run_steps(k)` trains `model` for k steps on a client's data and returns their wall seconds.
        repeats: timed repetitions of each measurement (>= 1); medians are kept.

    Returns:
        the profile; a parameter whose timed module holds n prunable weights gets seconds / n each.
        A parameter with no module called on the way to the root (the step never calls the root
        as a module, and the parameter is used by a method other than `forward`) gets 0: its time
        stays in the step's fixed part.
    """
    inputs = record_inputs(model, lambda: run_steps(1))
    step_s = statistics.median(run_steps(1) for _ in range(repeats))
    owners = {n: timed_module(model, n, set(inputs)) for n in specs}
    owners = {n: p for n, p in owners.items() if p in inputs}
    seconds = {
        path: median_seconds(module_step(model.get_submodule(path), *inputs[path]), repeats)
        for path in dict.fromkeys(owners.values())
    }
    weights = {path: sum(specs[n].numel for n, p in owners.items() if p == path) for path in seconds}
    return StepProfile(step_s, {n: seconds[owners[n]] / weights[owners[n]] if n in owners else 0.0 for n in specs})

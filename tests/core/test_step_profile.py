"""The measured time model of PruneFL: a training step timed per prunable layer (`fedprune_core.step_profile`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune_core.prunable import find_prunable
from fedprune_core.step_profile import StepProfile, profile_step, timed_module
from fedprune_core.strategies.prunefl import measured_time_model


class _Attention(nn.Module):
    """A Linear, an attention (its output projection is not called as a module) and an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.lstm(h)[0]


def _run_steps(model: nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(steps: int) -> float:
        calls.append(steps)
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
        return 1e-3 * steps

    return calls, run


def test_each_prunable_weight_is_timed_by_its_module_or_its_nearest_called_ancestor() -> None:
    called = {"", "inp", "attn", "lstm"}
    model = _Attention()
    assert timed_module(model, "inp.weight", called) == "inp"
    assert timed_module(model, "attn.out_proj.weight", called) == "attn"  # called functionally inside attn
    assert timed_module(model, "attn.in_proj_weight", called) == "attn"
    assert timed_module(model, "lstm.weight_hh_l0", called) == "lstm"
    assert timed_module(model, "weight", called) == ""


def test_profile_times_every_prunable_parameter_and_splits_a_module_over_its_weights() -> None:
    torch.manual_seed(0)
    model = _Attention()
    specs = find_prunable(model, ("*weight*",), "unstructured")
    calls, run = _run_steps(model)
    profile = profile_step(model, specs, run, repeats=3)  # type: ignore[arg-type]
    assert calls == [1, 1, 1, 1]  # the step that records inputs, then three timed steps
    assert profile.step_s == pytest.approx(1e-3)  # the median of what run_steps reported
    assert set(profile.layer_s) == set(specs) and all(s > 0 for s in profile.layer_s.values())
    # one timed module, one cost per weight: the attention's two matrices share the attention's seconds
    assert profile.layer_s["attn.in_proj_weight"] == profile.layer_s["attn.out_proj.weight"]
    assert profile.layer_s["lstm.weight_ih_l0"] == profile.layer_s["lstm.weight_hh_l0"]


def test_measured_time_model_from_a_known_profile() -> None:
    model = nn.Sequential(nn.Linear(5, 2), nn.Linear(5, 1, bias=False))  # weights of 10 and 5, one bias of 2
    specs = find_prunable(model, ("*weight",), "unstructured")
    weights = {n: p.detach() for n, p in model.named_parameters()}
    profile = StepProfile(step_s=1.0, layer_s={"0.weight": 0.01, "1.weight": 0.02})
    assert profile.fixed_s(specs) == pytest.approx(1.0 - 10 * 0.01 - 5 * 0.02)
    costs, constant = measured_time_model(profile, specs, weights, steps=2, bandwidth=100.0)
    # per kept weight: 2 steps x its seconds + 2 x 4 bytes / 100 B/s
    assert costs == pytest.approx({"0.weight": 2 * 0.01 + 0.08, "1.weight": 2 * 0.02 + 0.08})
    # T0: 2 steps x 0.8 s outside the prunable layers + the bias (2 float32) down and up
    assert constant == pytest.approx(2 * 0.8 + 2 * 2 * 4 / 100.0)


def test_fixed_part_of_a_step_is_never_negative() -> None:
    model = nn.Linear(4, 4)
    specs = find_prunable(model, ("weight",), "unstructured")
    assert StepProfile(step_s=0.1, layer_s={"weight": 1.0}).fixed_s(specs) == 0.0

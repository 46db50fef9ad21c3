"""Masked FedAvg (McMahan et al. 2017) and the FedOpt server step (Reddi et al. 2021)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune_core.aggregate import ClientContribution, masked_fedavg, server_step, validate_server_optimizer

T, F = True, False


def test_fedavg_weights_clients_by_example_counts() -> None:
    server = {"w": torch.tensor([0.0, 0.0])}
    a = ClientContribution({"w": torch.tensor([1.0, 2.0])}, {}, 1)
    b = ClientContribution({"w": torch.tensor([5.0, 6.0])}, {}, 3)
    average, trained = masked_fedavg(server, [a, b])
    assert torch.equal(average["w"], torch.tensor([4.0, 5.0]))  # (1 + 15) / 4, (2 + 18) / 4
    assert trained["w"].all()


def test_each_coordinate_averages_over_the_clients_that_held_it() -> None:
    server = {"w": torch.tensor([10.0, 20.0, 30.0]), "b": torch.tensor([7.0])}
    a = ClientContribution(
        {"w": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([1.0])}, {"w": torch.tensor([T, T, F])}, 1
    )
    b = ClientContribution(
        {"w": torch.tensor([0.0, 6.0, 0.0]), "b": torch.tensor([3.0])}, {"w": torch.tensor([F, T, F])}, 3
    )
    average, trained = masked_fedavg(server, [a, b])
    # coordinate 0: only a (1.0); 1: (2 + 18) / 4; 2: nobody -> the server's 30
    assert torch.equal(average["w"], torch.tensor([1.0, 5.0, 30.0]))
    assert trained["w"].tolist() == [T, T, F]
    assert torch.equal(average["b"], torch.tensor([2.5])) and trained["b"].tolist() == [T]  # (1 + 9) / 4


def test_no_contribution_is_an_error() -> None:
    with pytest.raises(ValueError, match="no client contributions"):
        masked_fedavg({"w": torch.zeros(2)}, [])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 1000), st.floats(0.0, 1.0))
def test_a_single_client_returns_that_client(seed: int, examples: int, density: float) -> None:
    g = torch.Generator().manual_seed(seed)
    server = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(3, generator=g)}
    held = torch.rand(4, 5, generator=g) < density
    values = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(3, generator=g)}
    average, trained = masked_fedavg(server, [ClientContribution(values, {"w": held}, examples)])
    assert torch.equal(average["w"], torch.where(held, values["w"], server["w"]))
    assert torch.equal(average["b"], values["b"])
    assert torch.equal(trained["w"], held)


def test_server_step_with_unit_lr_and_no_momentum_is_plain_fedavg() -> None:
    w = {"w": torch.tensor([1.0, 2.0])}
    avg = {"w": torch.tensor([0.5, 2.0])}
    new_w, new_m, grads = server_step(w, avg, {"w": torch.tensor([T, F])}, {})
    assert torch.equal(new_w["w"], avg["w"])
    assert torch.equal(grads["w"], torch.tensor([0.5, 0.0]))
    assert torch.equal(new_m["w"], torch.zeros(2))


def test_fedopt_momentum_by_hand_and_untrained_coordinates_keep_weight_and_momentum() -> None:
    # lr 0.5, momentum 0.9; coordinate 1 never trained
    w = {"w": torch.tensor([1.0, 4.0])}
    trained = {"w": torch.tensor([T, F])}
    # round 1: delta = 1 - 0 = 1 -> m = 1, w = 1 - 0.5 = 0.5
    w1, m1, g1 = server_step(w, {"w": torch.tensor([0.0, 9.0])}, trained, {}, 0.5, 0.9)
    assert torch.equal(w1["w"], torch.tensor([0.5, 4.0])) and torch.equal(m1["w"], torch.tensor([1.0, 0.0]))
    assert torch.equal(g1["w"], torch.tensor([1.0, 0.0]))
    # round 2: delta = 0.5 - 0.25 = 0.25 -> m = 0.9 + 0.25 = 1.15, w = 0.5 - 0.575 = -0.075
    w2, m2, _ = server_step(w1, {"w": torch.tensor([0.25, 9.0])}, trained, m1, 0.5, 0.9)
    assert torch.allclose(m2["w"], torch.tensor([1.15, 0.0]))
    assert torch.allclose(w2["w"], torch.tensor([-0.075, 4.0]))


@pytest.mark.parametrize(("lr", "momentum", "fragment"), [
    (0.0, 0.0, "server_lr=0.0 must be > 0"),
    (1.0, 1.0, "server_momentum=1.0 must be in [0, 1)"),
    (1.0, -0.1, "server_momentum=-0.1"),
])  # fmt: skip
def test_bad_server_optimizer_names_the_value(lr: float, momentum: float, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_server_optimizer(lr, momentum)
    assert fragment in str(err.value) and "plain FedAvg" in str(err.value)

"""The client-failure policy: who takes part in a round, and the reference loop under failures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from fedprune_core.config import FederatedConfig
from fedprune_core.participation import (
    RoundFailedError,
    RoundParticipation,
    decide,
    min_clients,
    one_line,
    participation_csv,
)
from fedprune_core.presets import preset
from fedprune_core.rng import sample_clients
from fedprune_core.simulate import simulate
from infra.errors import ClientDataError
from infra.workloads import LazyClients, load


def test_min_clients_defaults_to_half_the_sampled_clients_rounded_up() -> None:
    assert min_clients(FederatedConfig(clients_per_round=8)) == 4
    assert min_clients(FederatedConfig(clients_per_round=5)) == 3
    assert min_clients(FederatedConfig(clients_per_round=1)) == 1
    assert min_clients(FederatedConfig(clients_per_round=5, min_clients=1)) == 1


@pytest.mark.parametrize("bad", [0, 6, 2.5, True])
def test_min_clients_outside_one_to_clients_per_round_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=f"min_clients={bad}"):
        FederatedConfig(clients_per_round=5, min_clients=bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "10"])
def test_client_timeout_must_be_positive_seconds(bad: Any) -> None:
    with pytest.raises(ValueError, match="client_timeout_s="):
        FederatedConfig(client_timeout_s=bad)


def test_a_round_with_enough_finished_clients_leaves_the_others_out() -> None:
    fed = FederatedConfig(clients_per_round=4, min_clients=2)
    decided = decide(7, [1, 3, 5, 6], [6, 1, 5], {3: "ClientDataError: bad wav"}, fed)
    assert decided == RoundParticipation(7, (1, 3, 5, 6), (1, 5, 6), {3: "ClientDataError: bad wav"})
    assert not decided.complete
    assert decided.summary() == "round 7: 3 of 4 clients took part, left out client 3: ClientDataError: bad wav"


def test_a_round_with_too_few_finished_clients_is_tried_again() -> None:
    fed = FederatedConfig(clients_per_round=4, min_clients=3)
    assert decide(7, [1, 3, 5, 6], [1, 5], {3: "x", 6: "y"}, fed) is None


def test_a_recorded_round_needs_exactly_its_recorded_clients() -> None:
    fed = FederatedConfig(clients_per_round=4, min_clients=1)
    recorded = RoundParticipation(7, (1, 3, 5, 6), (1, 5), {3: "x", 6: "y"})
    assert decide(7, [1, 3, 5, 6], [1], {5: "lost"}, fed, recorded) is None
    assert decide(7, [1, 3, 5, 6], [1, 5], {}, fed, recorded) is recorded


def test_participation_round_trips_through_json_and_csv() -> None:
    p = RoundParticipation(3, (0, 2, 4), (0, 4), {2: 'OSError: "disk"'})
    assert RoundParticipation.from_json(p.to_json()) == p
    assert participation_csv([p]).splitlines() == [
        "round,client,status,reason", '3,0,done,""', "3,2,left_out,\"OSError: 'disk'\"", '3,4,done,""',
    ]
    assert one_line(ValueError("first line\nsecond")) == "ValueError: first line"


def _failing(clients: Sequence[Sequence[Any]], bad: set[int]) -> LazyClients:
    """The toy clients behind LazyClients, whose loader cannot read the `bad` ones."""

    def read(name: str) -> Sequence[Any]:
        if int(name) in bad:
            raise OSError(f"client file {name}.wav is truncated")
        return clients[int(name)]

    return LazyClients([str(i) for i in range(len(clients))], read)


def test_lazy_clients_fail_one_client_with_its_name_not_the_others() -> None:
    lazy = _failing([[1], [2], [3]], {1})
    assert lazy[0] == [1] and lazy[2] == [3] and len(lazy) == 3
    with pytest.raises(ClientDataError, match=r"client 1 \(1\).*truncated"):
        lazy[1]


def test_simulate_leaves_failing_clients_out_of_their_rounds() -> None:
    config = preset("toy", {"federated": {"clients_per_round": 6, "min_clients": 3}})
    data = load(config.model, config.corpus, config.seed, "unused")
    bad = {2, 5}
    result = simulate(data.workload, _failing(data.clients, bad), config)
    for r, metrics in enumerate(result.history, start=1):
        sampled = sample_clients(len(data.clients), 6, config.seed, r)
        failing = sorted(bad & set(sampled))
        assert metrics["clients_left_out"] == len(failing)
        assert metrics["clients_done"] == 6 - len(failing)
    recorded = {p.round_num: p for p in result.left_out}
    for p in recorded.values():
        assert set(p.failed) == bad & set(p.sampled) and set(p.done) == set(p.sampled) - bad
        assert all("truncated" in why for why in p.failed.values())
    again = simulate(data.workload, _failing(data.clients, bad), config)
    assert all(again.state.weights[n].equal(w) for n, w in result.state.weights.items())


def test_simulate_stops_naming_the_clients_when_too_few_finish() -> None:
    config = preset("toy", {"federated": {"clients_per_round": 8, "min_clients": 7}})
    data = load(config.model, config.corpus, config.seed, "unused")
    with pytest.raises(RoundFailedError, match=r"round 1: 6 .* 7 needed.*client 2: .*client 5: "):
        simulate(data.workload, _failing(data.clients, {2, 5}), config)

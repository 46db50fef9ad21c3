"""PruneFL (Jiang et al., TNNLS 2022): reconfiguration on hand-made tables, initial pruning, the engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from fedprune_core.config import ExperimentConfig, PruneFLConfig
from fedprune_core.engine import ServerState, init_state
from fedprune_core.simulate import simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.strategies.prunefl import (
    GSQ,
    GSQ_FIXED,
    TIME_CONSTANT,
    TIME_COST,
    PruneFL,
    density,
    greedy_additions,
    is_stable,
    modelled_round_time,
    reconfigure,
    removal_candidates,
    removal_fraction_at,
    time_model_tensors,
)
from fedprune_core.toy import Example, ToyWorkload
from fedprune_core.training import ClientResult, LocalTrainingConfig

TOY = ToyWorkload()  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
LOCAL = {"steps": 2, "batch_size": 8, "lr": 0.1}
T, F = True, False


def _config(**prunefl: object) -> ExperimentConfig:
    defaults = {"reconfig_every": 2, "initial_samples": 16, "initial_max_steps": 6,
                "initial_reconfig_every": 3, "time_constant": 1e-3, "time_model": "constant"}
    return ExperimentConfig.from_dict({
        "strategy": "prunefl",
        "prunefl": {**defaults, **prunefl},
        "schedule": {"num_rounds": 4, "sparsify_rounds": 1, "refine_rounds": 0},
        "federated": {"clients_per_round": 2, "eval_every": 2, "local": LOCAL},
    })


def _strategy(config: ExperimentConfig) -> PruneFL:
    strategy = make_strategy(config, TOY.build_model())
    assert isinstance(strategy, PruneFL)
    return strategy


def _table(cost_b: float) -> dict[str, dict[str, torch.Tensor]]:
    """Layer a: entries 0-2 active, entry 3 pruned; layer b: entry 0 active, entry 1 pruned."""
    return {
        "weights": {"a": torch.tensor([0.9, 0.1, 0.5, 0.0]), "b": torch.tensor([0.7, 0.0])},
        "masks": {"a": torch.tensor([T, T, T, F]), "b": torch.tensor([T, F])},
        "grad_sq": {"a": torch.tensor([4.0, 1.0, 2.0, 6.0]), "b": torch.tensor([3.0, 10.0])},
        "coeffs": {"a": 1.0, "b": cost_b},  # type: ignore[dict-item]
    }


def _reconfigure(cost_b: float) -> dict[str, list[bool]]:
    t = _table(cost_b)
    masks = reconfigure(t["weights"], t["masks"], t["grad_sq"], t["coeffs"], 0.5, 2.0)  # type: ignore[arg-type]
    return {n: m.tolist() for n, m in masks.items()}


def test_reconfigure_picks_the_expected_entries_and_regrows_a_pruned_one() -> None:
    # Removal: a has 3 active, int(0.5 * 3) = 1 candidate, the smallest |w| (a1); b has int(0.5) = 0.
    # Kept {a0, a2, b0}: importance 4 + 2 + 3 = 9, time 2 + 2 * 1 + 1 * 4 = 8, objective 1.125.
    # Candidates by g²/cost: a3 6/1 = 6, b1 10/4 = 2.5, a1 1/1 = 1.
    # a3: 6 > 9/8 -> add (15/9); b1: 2.5 > 15/9 -> add (25/13); a1: 1 < 25/13 -> stop.
    assert _reconfigure(cost_b=4.0) == {"a": [T, F, T, T], "b": [T, T]}


def test_reconfigure_adds_only_while_the_ratio_beats_the_objective_strictly() -> None:
    # cost_b = 10: time 14, objective 9/14; a3: 6 > 9/14 -> add (15/15 = 1); b1: 10/10 = 1, not > 1 -> stop.
    assert _reconfigure(cost_b=10.0) == {"a": [T, F, T, T], "b": [T, F]}


def test_reconfigure_counts_the_importance_of_parameters_never_pruned() -> None:
    # fixed importance 9 lifts the objective to 18/8: a3 (6) is added (24/9), b1 (2.5 < 24/9) is not.
    t = _table(4.0)
    masks = reconfigure(t["weights"], t["masks"], t["grad_sq"], t["coeffs"], 0.5, 2.0, 9.0)  # type: ignore[arg-type]
    assert {n: m.tolist() for n, m in masks.items()} == {"a": [T, F, T, T], "b": [T, F]}


def test_reconfigure_keeps_at_most_max_kept_weights() -> None:
    t = _table(4.0)
    args = (t["weights"], t["masks"], t["grad_sq"], t["coeffs"], 0.5, 2.0, 0.0)

    def run(max_kept: int) -> dict[str, list[bool]]:
        return {n: m.tolist() for n, m in reconfigure(*args, max_kept=max_kept).items()}  # type: ignore[arg-type]

    # Unlimited it keeps 5 (see above); with 4 the greedy order stops after a3 (b1 next, 2.5 per cost).
    assert run(4) == {"a": [T, F, T, T], "b": [T, F]}
    # 2: after removal 3 are kept (a0 4/1, a2 2/1, b0 3/4): the lowest per cost (b0) goes, nothing is added.
    assert run(2) == {"a": [T, F, T, F], "b": [F, F]}
    assert run(5) == run(100) == _reconfigure(cost_b=4.0)  # a budget above the objective's choice changes nothing


def test_max_density_caps_prunefl_through_initial_pruning_and_rounds() -> None:
    def densities(config: ExperimentConfig) -> list[float]:
        states: list[ServerState] = []
        simulate(TOY, TOY.make_clients(3, 16, seed=0), config, on_round=lambda state, _: states.append(state))
        return [density(s.masks) for s in states]

    free, capped = densities(_config()), densities(_config(max_density=0.3))
    assert max(free) > 0.3  # the objective alone keeps more here
    assert max(capped) <= 0.3
    assert _strategy(_config()).max_kept is None
    with pytest.raises(ValueError, match=r"prunefl.max_density=0.0 must be in \(0, 1\]"):
        PruneFLConfig(max_density=0.0)


def test_reconfigure_without_masked_parameters_returns_no_masks() -> None:
    assert reconfigure({}, {}, {}, {}, 0.3, 1.0) == {}


def test_greedy_additions_on_sorted_candidates() -> None:
    gains = torch.tensor([6.0, 10.0, 1.0], dtype=torch.float64)
    costs = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)
    assert greedy_additions(gains, costs, 9.0, 8.0) == 2  # 6 > 9/8, 10/4 > 15/9, 1 < 25/13
    assert greedy_additions(gains, costs, 0.0, 0.0) == 1  # time 0: the first gain helps, then 10/4 < 6/1
    assert greedy_additions(gains[:0], costs[:0], 1.0, 1.0) == 0


def test_removal_candidates_lowest_magnitude_of_active_weights_ties_keep_the_lower_index() -> None:
    w = torch.tensor([0.3, -0.1, 0.2, 0.1, 0.05])
    mask = torch.tensor([T, T, T, T, F])  # entry 4 is pruned: never a removal candidate
    assert removal_candidates(w, mask, 0.5).tolist() == [F, T, F, T, F]  # int(0.5 * 4) = 2
    assert removal_candidates(w, mask, 0.25).tolist() == [F, F, F, T, F]  # |w| tie 0.1: index 3 goes
    assert removal_candidates(w, mask, 0.0).tolist() == [F] * 5
    assert removal_candidates(w, mask, 0.99).sum() == 3  # int(3.96): one active weight always stays


def test_removal_fraction_halves_every_halflife() -> None:
    assert [removal_fraction_at(r, 0.3, 10000.0) for r in (0, 10000, 20000)] == [0.3, 0.15, 0.075]


def test_modelled_round_time_is_constant_plus_kept_weights_times_cost() -> None:
    masks = {"a": torch.tensor([T, F, T]), "b": torch.tensor([T, T])}
    assert modelled_round_time(masks, {"a": 0.5, "b": 2.0}, 1.0) == 1.0 + 2 * 0.5 + 2 * 2.0


def test_initial_pruning_stops_when_density_is_stable() -> None:
    assert is_stable([1.0, 0.5, 0.48, 0.47], changes=2, tolerance=0.1)
    assert not is_stable([1.0, 0.5, 0.48, 0.47], changes=3, tolerance=0.1)
    assert not is_stable([0.5], changes=1, tolerance=0.1)


def test_reconfiguration_rounds_follow_the_interval() -> None:
    strategy = _strategy(_config(reconfig_every=3))
    assert [r for r in range(1, 11) if strategy.reconfigures_at(r)] == [4, 7, 10]


def test_observe_accumulates_squared_gradients_and_resets_after_a_reconfiguration() -> None:
    strategy = _strategy(_config(reconfig_every=2))  # reconfigures at rounds 3, 5, ...
    grad_sq = {n: torch.ones(p.shape) for n, p in TOY.build_model().named_parameters()}
    fixed_per_round = float(sum(g.numel() for n, g in grad_sq.items() if n not in strategy.specs))
    extra: dict[str, torch.Tensor] = {}
    seen = []
    for last_round in range(4):  # observe rounds 1, 2, 3, 4
        extra = strategy.observe(ServerState(last_round, {}, extra=extra), {}, {}, {}, grad_sq)
        seen.append((float(extra[GSQ + "2.weight"][0, 0]), float(extra[GSQ_FIXED][0]) / fixed_per_round))
    assert seen == [(1.0, 1.0), (2.0, 2.0), (1.0, 1.0), (2.0, 2.0)]


def test_invalid_parameters_are_rejected_before_any_work() -> None:
    bad: list[tuple[dict[str, object], str]] = [
        ({"reconfig_every": 0}, r"prunefl.reconfig_every=0 must be >= 1"),
        ({"removal_fraction": 1.0}, r"prunefl.removal_fraction=1.0 must be in \[0, 1\)"),
        ({"compute_coeff": -1e-6}, r"prunefl.compute_coeff=-1e-06 must be >= 0"),
        ({"time_constant": -1.0}, r"prunefl.time_constant=-1.0 must be >= 0"),
        ({"compute_coeff": 0.0, "comm_coeff": 0.0}, r"compute_coeff \+ comm_coeff must be > 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            PruneFLConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="glob 'enc.*' matches no prunable parameter"):
        _strategy(_config(layer_coeffs=[["enc.*", 1e-6, 1e-6]]))
    with pytest.raises(ValueError, match=r"gives 0.weight compute \+ comm = 0.0"):
        _strategy(_config(layer_coeffs=[["0.*", 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"removal_fraction=1.5 must be in \[0, 1\)"):
        reconfigure({}, {}, {}, {}, 1.5, 1.0)


def test_layer_coefficients_override_by_glob() -> None:
    strategy = _strategy(_config(compute_coeff=2e-6, comm_coeff=1e-6, layer_coeffs=[["0.*", 5e-6, 1e-6]]))
    assert strategy.costs == {"0.weight": 5e-6 + 1e-6, "2.weight": 3e-6, "4.weight": 3e-6}


@dataclasses.dataclass(frozen=True)
class _CountingToy(ToyWorkload):
    """ToyWorkload that records the steps of every local training it runs."""

    calls: list[int] = dataclasses.field(default_factory=list)

    def train_client(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        config: LocalTrainingConfig,
        generator: torch.Generator,
        after_step: Callable[[], None] | None = None,
    ) -> ClientResult:
        self.calls.append(config.steps)
        return super().train_client(model, examples, config, generator, after_step)


def _initialize(config: ExperimentConfig, workload: ToyWorkload = TOY) -> ServerState:
    clients = TOY.make_clients(2, 16, seed=0)
    return _strategy(config).initialize(init_state(workload, config.seed), workload, clients)


def test_initial_pruning_trains_in_chunks_up_to_the_step_budget() -> None:
    workload = _CountingToy()
    config = _config(initial_max_steps=8, initial_reconfig_every=3, initial_stable_changes=5)
    state = _initialize(config, workload)
    assert workload.calls == [3, 3, 2]
    assert set(state.masks) == {"0.weight", "2.weight", "4.weight"} and state.extra == {}
    kept = sum(int(m.sum()) for m in state.masks.values())
    assert 0 < kept < sum(m.numel() for m in state.masks.values())
    for name, mask in state.masks.items():
        assert torch.equal(state.weights[name][~mask], torch.zeros(int((~mask).sum()))), name


def test_initial_pruning_stops_early_once_density_settles() -> None:
    workload = _CountingToy()
    _initialize(_config(initial_max_steps=100, initial_reconfig_every=3, initial_stable_changes=1,
                        initial_tolerance=0.99), workload)
    assert workload.calls == [3, 3]  # two densities, one move within tolerance


def test_initial_pruning_is_deterministic_and_checks_the_client() -> None:
    a, b = _initialize(_config()), _initialize(_config())
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    with pytest.raises(ValueError, match=r"initial_client=5 is not one of the 2 clients"):
        _initialize(_config(initial_client=5))


def _flat(state: ServerState) -> list[torch.Tensor]:
    return [*state.weights.values(), *state.masks.values(), *state.extra.values()]


def test_simulate_is_deterministic_and_resumes_bit_for_bit() -> None:
    clients = TOY.make_clients(3, 16, seed=0)
    config = _config(reconfig_every=2)  # reconfigures at round 3
    full = simulate(TOY, clients, config).state
    again = simulate(TOY, clients, config).state
    first_half = simulate(TOY, clients, config.replace({"schedule": {"num_rounds": 2}})).state
    resumed = simulate(TOY, clients, config, state=first_half).state
    assert full.round_num == resumed.round_num == 4
    assert any(not torch.equal(full.masks[n], first_half.masks[n]) for n in full.masks)  # reconfigured at 3
    for a, b, c in zip(_flat(full), _flat(again), _flat(resumed), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_federated_rounds_see_squared_gradients_of_pruned_weights() -> None:
    clients = TOY.make_clients(3, 16, seed=0)
    state = simulate(TOY, clients, _config().replace({"schedule": {"num_rounds": 1}})).state
    pruned = ~state.masks["2.weight"]
    assert bool((state.extra[GSQ + "2.weight"][pruned] > 0).any())


# --- the measured time model ---------------------------------------------------------------------


def _measured(**prunefl: object) -> ExperimentConfig:
    return _config(time_model="measured", profile_repeats=2, **prunefl)


def test_measured_time_model_is_stored_in_round_zero_and_kept_by_every_round() -> None:
    clients = TOY.make_clients(3, 16, seed=0)
    config = _measured(reconfig_every=2)
    start = _strategy(config).initialize(init_state(TOY, config.seed), TOY, clients)
    specs = _strategy(config).specs
    timing = {k: t for k, t in start.extra.items() if k.startswith(TIME_COST) or k == TIME_CONSTANT}
    assert set(timing) == {TIME_COST + n for n in specs} | {TIME_CONSTANT}
    assert all(t.dtype == torch.float64 and t.shape == (1,) and float(t) > 0 for t in timing.values())
    rounds: list[ServerState] = []
    simulate(TOY, clients, config, state=start, on_round=lambda state, _: rounds.append(state))
    assert len(rounds) == 4
    for state in rounds:
        assert all(torch.equal(state.extra[k], t) for k, t in timing.items()), state.round_num


def test_reconfiguration_uses_the_stored_time_model_not_the_configured_one() -> None:
    strategy = _strategy(_measured(reconfig_every=1))
    model = dict(TOY.build_model().named_parameters())
    weights = {n: p.detach() for n, p in model.items()}
    masks = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in strategy.specs.items()}
    gsq = {GSQ + n: torch.rand(s.shape, generator=torch.Generator().manual_seed(1)) for n, s in strategy.specs.items()}
    stored = {"0.weight": 1.0, "2.weight": 1e-6, "4.weight": 1e-6}  # layer 0 made very expensive
    state = ServerState(1, weights, masks, extra={**gsq, **time_model_tensors(stored, 0.5)})
    got = strategy.mask(state, {}, 2)
    grad_sq = {n: gsq[GSQ + n] for n in strategy.specs}
    expected = reconfigure(weights, masks, grad_sq, stored, removal_fraction_at(2, 0.3, 10000.0), 0.5)
    configured = reconfigure(weights, masks, grad_sq, strategy.costs, removal_fraction_at(2, 0.3, 10000.0), 1e-3)
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert any(not torch.equal(got[n], configured[n]) for n in got)
    assert strategy.time_model(state.extra) == (stored, 0.5)
    assert strategy.time_model({}) == (strategy.costs, 1e-3)  # constant model, or a run older than the measured one


def test_measured_run_resumes_bit_for_bit_without_measuring_again() -> None:
    """A resumed run reads the time model from its state (also through safetensors) and ends where an
    uninterrupted run from the same round 0 ends."""
    from safetensors.torch import load, save

    clients = TOY.make_clients(3, 16, seed=0)
    config = _measured(reconfig_every=2)  # reconfigures at round 3
    start = _strategy(config).initialize(init_state(TOY, config.seed), TOY, clients)
    full = simulate(TOY, clients, config, state=start).state
    half = simulate(TOY, clients, config.replace({"schedule": {"num_rounds": 2}}), state=start).state
    reloaded = ServerState.from_flat(half.round_num, load(save(half.flat())))
    resumed = simulate(TOY, clients, config, state=reloaded).state
    assert any(not torch.equal(full.masks[n], half.masks[n]) for n in full.masks)  # reconfigured at round 3
    expected, got = full.flat(), resumed.flat()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_modelled_round_time_is_logged_every_round_under_the_time_model_in_force() -> None:
    clients = TOY.make_clients(3, 16, seed=0)
    config = _measured(reconfig_every=2)
    strategy = _strategy(config)
    start = strategy.initialize(init_state(TOY, config.seed), TOY, clients)
    costs, constant = strategy.time_model(start.extra)
    states: list[ServerState] = []
    result = simulate(TOY, clients, config, state=start, on_round=lambda state, _: states.append(state))
    for state, row in zip(states, result.history, strict=True):
        kept = {n: int(m.sum()) for n, m in state.masks.items()}
        assert row["modelled_round_time_s"] == pytest.approx(constant + sum(costs[n] * k for n, k in kept.items()))


def test_interval_is_a_share_of_the_run_unless_given() -> None:
    assert PruneFLConfig().interval(10_000) == 50  # the paper: 50 rounds of 10,000
    assert PruneFLConfig().interval(100) == 1 and PruneFLConfig().interval(3000) == 15
    assert PruneFLConfig(reconfig_fraction=0.1).interval(200) == 20
    assert PruneFLConfig(reconfig_every=7).interval(10_000) == 7
    strategy = _strategy(_config(reconfig_every=None, reconfig_fraction=0.5))  # 4 rounds: every 2
    assert [r for r in range(1, 8) if strategy.reconfigures_at(r)] == [3, 5, 7]


def test_time_model_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match=r"prunefl.time_model='timed' is not known: use one of measured, constant"):
        PruneFLConfig(time_model="timed")
    with pytest.raises(ValueError, match=r"layer_coeffs=.* are given but prunefl.time_model='measured'"):
        PruneFLConfig(layer_coeffs=(("0.*", 1e-6, 1e-6),))
    with pytest.raises(ValueError, match=r"bandwidth_bytes_per_s=0.0 must be > 0"):
        PruneFLConfig(bandwidth_bytes_per_s=0.0)
    with pytest.raises(ValueError, match=r"reconfig_fraction=0.0 must be in \(0, 1\]"):
        PruneFLConfig(reconfig_fraction=0.0)
    assert PruneFLConfig(time_model="constant", layer_coeffs=(("0.*", 1e-6, 1e-6),)).layer_coeffs


def test_initial_training_returns_full_shapes_when_a_convolution_channel_is_pruned_whole(tmp_path: Path) -> None:
    """An input channel no kept weight reads is left out of the client's convolution; initial pruning
    still gets weights and squared gradients of every parameter's full shape."""
    from infra.workloads import load

    config = ExperimentConfig(model="tiny", corpus="test", strategy="prunefl",
                              prunefl=PruneFLConfig(time_model="constant"))
    data = load(config.model, config.corpus, config.seed, str(tmp_path))
    strategy = make_strategy(config, data.workload.build_model())
    assert isinstance(strategy, PruneFL)
    state = init_state(data.workload, config.seed)
    masks = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in strategy.specs.items()}
    reader = "transcriber.subsampling.conv.2.weight"
    masks[reader][:, 3] = False  # no kept weight reads input channel 3: the client's conv.2 leaves it out
    weights, grad_sq = strategy._train_masked(data.workload, state.weights, masks, data.clients[0][:8], 2,
                                              torch.Generator().manual_seed(0), 0)
    assert {n: w.shape for n, w in weights.items()} == {n: w.shape for n, w in state.weights.items()}
    assert all(grad_sq[n].shape == state.weights[n].shape for n in strategy.specs)
    assert not torch.equal(weights[reader], state.weights[reader])  # trained
    assert bool((grad_sq[reader][:, 3] == 0).all()) and float(grad_sq[reader].sum()) > 0


def test_a_round_whose_client_leaves_an_unread_input_channel_out_aggregates_full_shapes(tmp_path: Path) -> None:
    """PruneFL's clients send dense squared gradients, except for a layer built without its unread
    inputs: that one's squares of its held entries, encoded like its update, which the server reads."""
    from fedprune_core.engine import aggregate, dispatch, train_client
    from infra.workloads import load

    config = ExperimentConfig(model="tiny", corpus="test", strategy="prunefl",
                              prunefl=PruneFLConfig(time_model="constant"))
    data = load(config.model, config.corpus, config.seed, str(tmp_path))
    strategy = make_strategy(config, data.workload.build_model())
    state = init_state(data.workload, config.seed)
    masks = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in strategy.specs.items()}
    reader = "transcriber.subsampling.conv.2.weight"
    masks[reader][:, 3] = False
    state = dataclasses.replace(state, masks=masks)
    outcomes = [train_client(data.workload, config, strategy, dispatch(strategy, state, masks, 1, c), data.clients[c],
                             1, c) for c in (0, 1)]
    assert all(f"{reader}|v" in o.grad_sq for o in outcomes if o.grad_sq is not None)
    after = aggregate(strategy, config, state, {}, masks, outcomes, 1)
    assert {n: w.shape for n, w in after.weights.items()} == {n: w.shape for n, w in state.weights.items()}

"""Federated Dropout (Caldas et al. 2018): random per-client sub-models, exact sizes, exact averaging."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedprune_core.config import ExperimentConfig, FedDropoutConfig
from fedprune_core.engine import ClientOutcome, ServerState, aggregate, dispatch
from fedprune_core.prunable import PrunableSpec, find_prunable
from fedprune_core.rng import generator_for
from fedprune_core.simulate import simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.strategies.fed_dropout import FedDropout, drop_rows, dropout_mask
from fedprune_core.submodel import build_client_model, client_update, expand, extract
from fedprune_core.toy import ToyWorkload
from fedprune_core.types import Payload

TOY = ToyWorkload()  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
LOCAL = {"steps": 2, "batch_size": 8, "lr": 0.1}


def _config(**fed_dropout: object) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "strategy": "fed_dropout",
        "fed_dropout": fed_dropout,
        "schedule": {"num_rounds": 4, "sparsify_rounds": 1, "refine_rounds": 0},
        "federated": {"clients_per_round": 2, "eval_every": 2, "local": LOCAL},
    })


def _strategy(config: ExperimentConfig, workload: ToyWorkload = TOY) -> FedDropout:
    strategy = make_strategy(config, workload.build_model())
    assert isinstance(strategy, FedDropout)
    return strategy


@pytest.mark.parametrize(("rows", "rate", "dropped"), [(10, 0.5, 5), (7, 0.3, 2), (4, 0.25, 1), (4, 0.0, 0)])
def test_drop_rows_drops_exactly_rate_of_units(rows: int, rate: float, dropped: int) -> None:
    keep = drop_rows(rows, rate, generator_for(0, 1, 0, "t"))
    assert keep.shape == (rows,) and int((~keep).sum()) == dropped


def test_fused_projection_drops_rows_in_each_stacked_matrix() -> None:
    spec = PrunableSpec("attn.in_proj_weight", (6, 4), 3, False, "row")
    mask = dropout_mask(spec, 0.5, generator_for(0, 1, 0, "t"))
    rows_kept = mask[:, 0].reshape(3, 2).sum(dim=1)
    assert rows_kept.tolist() == [1, 1, 1]
    assert torch.equal(mask, mask[:, :1].expand(6, 4))  # whole rows


def test_client_masks_are_seeded_per_round_and_client() -> None:
    strategy = _strategy(_config(rate=0.5))
    state = ServerState(0, {})
    first = strategy.client_masks(state, {}, 3, 1)
    assert all(torch.equal(first[n], m) for n, m in strategy.client_masks(state, {}, 3, 1).items())
    assert not torch.equal(first["2.weight"], strategy.client_masks(state, {}, 3, 2)["2.weight"])
    assert not torch.equal(first["2.weight"], strategy.client_masks(state, {}, 4, 1)["2.weight"])
    assert strategy.mask(state, {}, 3) == {}  # the server keeps and evaluates the full model


def test_submodel_has_the_stated_size() -> None:
    # rate 0.5 everywhere except the classifier at 0.25: 32 -> 16 rows, 4 -> 3 rows; biases stay dense
    config = _config(rate=0.5, layer_rates=[["4.weight", 0.25]])
    strategy = _strategy(config)
    state = ServerState(0, {n: p.detach() for n, p in TOY.build_model().named_parameters()})
    payload = dispatch(strategy, state, {}, 1, 0)
    assert payload["0.weight|w0"].shape == (16, 16)
    assert payload["2.weight|w0"].shape == (16, 32)
    assert payload["4.weight|w0"].shape == (3, 32)
    assert payload["0.weight|r0"].shape == (16,) and "0.weight|c0" not in payload
    assert payload["0.bias"].shape == (32,) and payload["4.bias"].shape == (4,)


def test_layer_with_rate_zero_stays_dense() -> None:
    strategy = _strategy(_config(rate=0.5, layer_rates=[["4.weight", 0.0]]))
    assert set(strategy.specs) == {"0.weight", "2.weight"}


def test_submodel_scatters_back_exactly() -> None:
    strategy = _strategy(_config(rate=0.5))
    state = ServerState(0, {n: p.detach() for n, p in TOY.build_model().named_parameters()})
    masks = strategy.client_masks(state, {}, 1, 0)
    client = build_client_model(TOY.build_model(), dispatch(strategy, state, {}, 1, 0), strategy.specs)
    shapes = {n: w.shape for n, w in state.weights.items()}
    values, held = expand(client_update(client, strategy.specs), masks, strategy.specs, shapes)
    for name, w in state.weights.items():
        expected = w * masks[name] if name in masks else w
        assert torch.equal(values[name], expected), name
    assert all(torch.equal(held[n], masks[n]) for n in masks)


def test_two_clients_with_different_submodels_average_per_coordinate() -> None:
    # Linear(2, 4) -> Linear(4, 2), rows of the first weight dropped at 0.5. In round 2 (seed 0):
    # client 0 keeps rows {0, 1}, client 1 keeps rows {0, 2}; row 3 is held by neither.
    workload = ToyWorkload(in_dim=2, width=4, depth=1, classes=2)
    config = _config(rate=0.5, layer_rates=[["2.weight", 0.0]])
    strategy = _strategy(config, workload)
    weights = {n: torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
               for n, p in workload.build_model().named_parameters()}
    state = ServerState(1, weights)
    rows = [strategy.client_masks(state, {}, 2, c)["0.weight"][:, 0].tolist() for c in (0, 1)]
    assert rows == [[True, True, False, False], [True, False, True, False]]
    outcomes = []
    for client_id, delta, examples in ((0, 1.0, 1), (1, 3.0, 3)):  # client 0 adds 1, client 1 adds 3
        shifted = {n: w + delta for n, w in weights.items()}
        update = dispatch(strategy, ServerState(1, shifted), {}, 2, client_id)
        outcomes.append(ClientOutcome(client_id, update, examples, 0.0, 0.0, 0, 0, 0, 0))
    new = aggregate(strategy, config, state, {}, {}, outcomes, 2).weights
    # both: (1 * 1 + 3 * 3) / 4 = 2.5; only client 0: 1; only client 1: 3; neither: unchanged
    row_shift = torch.tensor([2.5, 1.0, 3.0, 0.0])
    assert torch.equal(new["0.weight"], weights["0.weight"] + row_shift[:, None])
    for dense in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(new[dense], weights[dense] + 2.5), dense


def test_out_of_range_rates_are_rejected_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"fed_dropout.rate=1.0 must be a fraction in \[0, 1\)"):
        FedDropoutConfig(rate=1.0)
    with pytest.raises(ValueError, match=r"layer_rates\['2.\*'\]=-0.1"):
        FedDropoutConfig(layer_rates=(("2.*", -0.1),))
    with pytest.raises(ValueError, match="glob 'decoder.*' matches no prunable parameter"):
        make_strategy(_config(layer_rates=[["decoder.*", 0.2]]), TOY.build_model())


def _weights(state: ServerState) -> list[torch.Tensor]:
    return list(state.weights.values())


def test_simulate_is_deterministic_and_resumes_bit_for_bit() -> None:
    clients = TOY.make_clients(3, 16, seed=0)
    config = _config(rate=0.5)
    full = simulate(TOY, clients, config).state
    again = simulate(TOY, clients, config).state
    first_half = simulate(TOY, clients, config.replace({"schedule": {"num_rounds": 2}})).state
    resumed = simulate(TOY, clients, config, state=first_half).state
    assert full.masks == {} and full.round_num == resumed.round_num == 4
    for a, b, c in zip(_weights(full), _weights(again), _weights(resumed), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def _one_layer(
    module: torch.nn.Module, dropped: list[int]
) -> tuple[torch.nn.Module, dict[str, PrunableSpec], torch.Tensor, Payload]:
    """A model of one layer, its row specs, the mask and the payload with output units `dropped` removed."""
    model = torch.nn.Sequential(module)
    specs = find_prunable(model, ("*weight",), "row")
    keep = torch.ones(module.weight.shape[0], dtype=torch.bool)
    keep[dropped] = False
    mask = keep.view(-1, *([1] * (module.weight.dim() - 1))).expand(module.weight.shape)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, specs, mask, extract(weights, {"0.weight": mask}, specs)


@pytest.mark.parametrize("layer", ["linear", "conv1d"])  # sliced (SlicedLinear) and masked dense
def test_rescaled_sub_model_is_inverted_dropout(layer: str) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 8) if layer == "linear" else torch.nn.Conv1d(6, 8, 3, padding=1)
    x = torch.randn(3, 6) if layer == "linear" else torch.randn(3, 6, 5)
    dropped = [1, 4, 5]
    full, specs, mask, payload = _one_layer(copy.deepcopy(module), dropped)
    w, b = module.weight.detach(), module.bias.detach()
    keep = torch.ones(8, dtype=torch.bool)
    keep[dropped] = False
    kept_w = w * keep.view(-1, *([1] * (w.dim() - 1)))
    units = F.linear(x, kept_w) if layer == "linear" else F.conv1d(x, kept_w, padding=1)
    shape = (1, -1) if layer == "linear" else (1, -1, 1)

    plain = build_client_model(copy.deepcopy(full), payload, specs)
    scaled = build_client_model(copy.deepcopy(full), payload, specs, rescale_kept=True)
    torch.testing.assert_close(plain.module(x), units + b.view(shape))
    torch.testing.assert_close(scaled.module(x), units * 8 / 5 + b.view(shape))  # kept units x rows / kept rows

    # It trains and uploads like the unscaled sub-model: same keys and shapes, unscaled weights,
    # dropped units still zero after `project`.
    before = client_update(scaled, specs)
    opt = torch.optim.SGD(scaled.module.parameters(), lr=0.1)
    scaled.module(x).pow(2).sum().backward()
    opt.step()
    scaled.project()
    after = client_update(scaled, specs)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in client_update(plain, specs).items()}
    assert all(not torch.equal(after[k], before[k]) for k in after)
    values, held = expand(after, {"0.weight": mask}, specs, {"0.weight": w.shape, "0.bias": b.shape})
    assert torch.equal(held["0.weight"], mask)
    if layer == "conv1d":  # masked dense: the parameter itself, dropped filters re-zeroed by project
        weight = dict(scaled.module.named_parameters())["0.parametrizations.weight.original"]
        assert (weight[dropped] == 0).all() and torch.equal(weight[keep], values["0.weight"][keep])


def test_rescale_is_for_unit_dropping_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 8))
    specs = find_prunable(model, ("*weight",), "column")
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[:, :2] = False
    payload = extract({n: p.detach() for n, p in model.named_parameters()}, {"0.weight": mask}, specs)
    with pytest.raises(ValueError, match="pattern 'column'.*row"):
        build_client_model(model, payload, specs, rescale_kept=True)

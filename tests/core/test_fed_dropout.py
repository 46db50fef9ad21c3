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
from fedprune_core.submodel import (
    SlicedMultiheadAttention,
    build_client_model,
    client_update,
    expand,
    extract,
    payload_nbytes,
)
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


# --- hidden units: attention heads ------------------------------------------------------------

EMBED, HEADS, HEAD_DIM = 16, 4, 4


class _SelfAttention(torch.nn.Module):
    """One plain self-attention, sequence-first: (L, N, 16) -> (L, N, 16), 4 heads of 4 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(EMBED, HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _head_strategy(rate: float, rescale: bool = True) -> tuple[FedDropout, ExperimentConfig]:
    config = ExperimentConfig.from_dict({"strategy": "fed_dropout",
                                         "fed_dropout": {"units": "hidden", "rate": rate, "rescale": rescale}})
    return FedDropout.build(config, _SelfAttention()), config


def _kept_heads(masks: dict[str, torch.Tensor]) -> list[int]:
    columns = masks["attn.out_proj.weight"][0]  # the out projection reads dimension j as column j
    return columns.view(HEADS, HEAD_DIM).all(1).nonzero().flatten().tolist()


def _head_rows(heads: list[int]) -> torch.Tensor:
    """Rows of the fused q/k/v in-projection (and its bias) that compute `heads`."""
    return torch.tensor([i * EMBED + h * HEAD_DIM + j for i in range(3) for h in heads for j in range(HEAD_DIM)])


def test_a_head_is_drawn_whole_from_its_groups_generator() -> None:
    strategy, _ = _head_strategy(0.5)
    (group,) = strategy.groups
    assert (group.reader, group.producers, group.width, group.span, group.entries) == (
        "attn.out_proj.weight", ("attn.in_proj_weight",), EMBED, HEAD_DIM, ("attn.in_proj_bias",))
    state = ServerState(0, {})
    masks = strategy.client_masks(state, {}, 3, 1)
    heads = _kept_heads(masks)
    # num_pruned(4 heads, 0.5) = 2 heads, drawn as every group is, from (seed, round, client, reader)
    expected = drop_rows(HEADS, 0.5, generator_for(0, 3, 1, "fed_dropout:attn.out_proj.weight"))
    assert heads == expected.nonzero().flatten().tolist() and len(heads) == 2
    columns = torch.zeros(EMBED, dtype=torch.bool)
    columns[_head_rows(heads)[: len(heads) * HEAD_DIM]] = True
    assert torch.equal(masks["attn.out_proj.weight"], columns.expand(EMBED, EMBED))  # whole columns of kept heads
    rows = torch.zeros(3 * EMBED, dtype=torch.bool)
    rows[_head_rows(heads)] = True
    assert torch.equal(masks["attn.in_proj_weight"], rows[:, None].expand(3 * EMBED, EMBED))  # their q, k, v rows
    assert _kept_heads(strategy.client_masks(state, {}, 3, 1)) == heads
    assert len({tuple(_kept_heads(strategy.client_masks(state, {}, 3, c))) for c in range(4)}) > 1
    assert len({tuple(_kept_heads(strategy.client_masks(state, {}, r, 1))) for r in range(1, 5)}) > 1


@pytest.mark.parametrize("rescale", [False, True])
def test_a_client_attention_runs_the_kept_heads(rescale: bool) -> None:
    torch.manual_seed(0)
    full = _SelfAttention()
    strategy, _ = _head_strategy(0.5, rescale)
    weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    masks = strategy.client_masks(ServerState(0, weights), {}, 2, 0)
    payload = extract(weights, masks, strategy.specs)
    # 2 of 4 heads: 3 x 8 q/k/v rows and 8 out projection columns of 16, with their int32 indices;
    # the in-projection bias and the out projection's bias travel whole
    floats = 3 * 8 * EMBED + 3 * EMBED + EMBED * 8 + EMBED
    assert payload_nbytes(payload) == 4 * floats + 4 * (3 * 8 + 8)
    client = build_client_model(copy.deepcopy(full), payload, strategy.specs, strategy.rescale_kept)
    attn = client.module.attn
    assert isinstance(attn, SlicedMultiheadAttention) and (attn.num_heads, attn.head_dim) == (2, HEAD_DIM)
    shapes = [tuple(p.shape) for p in client.module.parameters()]
    assert sorted(shapes) == sorted([(3 * EMBED,), (8, EMBED), (8, EMBED), (8, EMBED), (EMBED, 8), (EMBED,)])

    # The reference: the full attention with the dropped heads' out projection columns zeroed
    # (with rescaling: the kept ones times heads / kept heads, before the bias).
    reference = copy.deepcopy(full)
    with torch.no_grad():
        reference.attn.out_proj.weight.mul_(masks["attn.out_proj.weight"] * (HEADS / 2 if rescale else 1.0))
    x = torch.randn(5, 3, EMBED)
    torch.testing.assert_close(client.module(x), reference(x), rtol=1e-5, atol=1e-6)

    # Gradients and optimizer state are those of the kept heads; the upload is their values.
    optimizer = torch.optim.Adam(client.module.parameters(), lr=0.01)
    client.module(x).pow(2).sum().backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in client.module.parameters())
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == floats
    update = client_update(client, strategy.specs)
    assert payload_nbytes(update) == 4 * floats
    values, held = expand(update, masks, strategy.specs, {n: w.shape for n, w in weights.items()})
    assert torch.equal(held["attn.in_proj_weight"], masks["attn.in_proj_weight"])
    assert not torch.equal(values["attn.in_proj_weight"][held["attn.in_proj_weight"]],
                           weights["attn.in_proj_weight"][held["attn.in_proj_weight"]])  # trained


def test_with_no_head_dropped_the_client_attention_is_the_dense_one() -> None:
    torch.manual_seed(0)
    full = _SelfAttention()
    weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    x = torch.randn(5, 3, EMBED)
    for rate in (0.0, 0.1):  # 0: no group; 0.1 of 4 heads rounds to 0 dropped
        strategy, _ = _head_strategy(rate)
        assert len(strategy.groups) == (rate > 0)
        payload = dispatch(strategy, ServerState(0, weights), {}, 1, 0)
        assert payload_nbytes(payload) == 4 * sum(w.numel() for w in weights.values())
        client = build_client_model(copy.deepcopy(full), payload, strategy.specs, strategy.rescale_kept)
        torch.testing.assert_close(client.module(x), full(x), rtol=1e-5, atol=1e-6)


def test_each_head_entry_is_averaged_over_the_clients_that_held_the_head() -> None:
    # Round 2 (seed 0): client 0 keeps heads {1, 3}, client 1 keeps {1, 2}; head 0 is held by neither.
    # Client 0 uploads every value + 1 (1 example), client 1 + 3 (3 examples), the in-projection
    # bias of the heads it dropped too (it travels whole).
    strategy, config = _head_strategy(0.5)
    weights = {n: torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
               for n, p in _SelfAttention().named_parameters()}
    state = ServerState(1, weights)
    assert [_kept_heads(strategy.client_masks(state, {}, 2, c)) for c in (0, 1)] == [[1, 3], [1, 2]]
    outcomes = []
    for client_id, delta, examples in ((0, 1.0, 1), (1, 3.0, 3)):
        update = dispatch(strategy, ServerState(1, {n: w + delta for n, w in weights.items()}), {}, 2, client_id)
        outcomes.append(ClientOutcome(client_id, update, examples, 0.0, 0.0, 0, 0, 0, 0))
    new = aggregate(strategy, config, state, {}, {}, outcomes, 2).weights
    # head 1: (1 * 1 + 3 * 3) / 4 = 2.5; head 3: client 0's 1; head 2: client 1's 3; head 0: unchanged
    expected = {n: w.clone() for n, w in weights.items()}
    for head, shift in ((0, 0.0), (1, 2.5), (2, 3.0), (3, 1.0)):
        rows = _head_rows([head])
        expected["attn.in_proj_weight"][rows] += shift
        expected["attn.in_proj_bias"][rows] += shift
        expected["attn.out_proj.weight"][:, rows[:HEAD_DIM]] += shift
    expected["attn.out_proj.bias"] += 2.5  # serves every head: every client
    for name, w in expected.items():
        assert torch.equal(new[name], w), name

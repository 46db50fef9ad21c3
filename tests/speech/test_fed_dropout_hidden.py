"""Federated Dropout of hidden units (`fed_dropout.units: hidden`) on the speech model: a dropped
unit loses its producer rows and its reader's column together, the client trains the narrower
modules (the attention on its kept heads), and with inverted-dropout scaling it computes what the
full model does with those units dropped and the kept ones scaled."""

from __future__ import annotations

import pytest
import torch

from fedprune_core.config import ExperimentConfig, FedDropoutConfig
from fedprune_core.engine import ClientOutcome, ServerState, aggregate, dispatch, evaluate
from fedprune_core.masks import num_pruned
from fedprune_core.simulate import simulate
from fedprune_core.speech.model import build_model
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.strategies import make_strategy
from fedprune_core.strategies.fed_dropout import FedDropout, client_share, rate_for_share
from fedprune_core.submodel import build_client_model, client_update, expand, extract, payload_nbytes
from fedprune_core.training import is_running_stat, model_state
from fedprune_core.units import LiveBatchNorm1d, LiveJoiner, held_entries

WORKLOAD = SpeechWorkload(model="tiny")
HIDDEN_TINY = {"strategy": "fed_dropout", "model": "tiny", "fed_dropout": {"units": "hidden"}}
FFN = "transcriber.conformer.conformer_layers.0.ffn1.sequential"
CONV = "transcriber.conformer.conformer_layers.0.conv_module.sequential"
ATTN = "transcriber.conformer.conformer_layers.0.self_attn"


def _strategy(**fed_dropout: object) -> FedDropout:
    config = ExperimentConfig.from_dict({
        "strategy": "fed_dropout", "model": "tiny", "fed_dropout": {"units": "hidden", **fed_dropout},
    })
    strategy = make_strategy(config, build_model("tiny"))
    assert isinstance(strategy, FedDropout)
    return strategy


def test_a_dropped_hidden_unit_takes_its_producer_rows_and_its_reader_column() -> None:
    strategy = _strategy(rate=0.5)
    assert {g.reader for g in strategy.groups} == {f"{FFN}.4.weight", f"{CONV}.5.weight", "joiner.linear.weight",
                                                  FFN.replace("ffn1", "ffn2") + ".4.weight", f"{ATTN}.out_proj.weight"}
    masks = strategy.client_masks(ServerState(0, {}), {}, 3, 1)
    assert set(masks) == set(strategy.specs)  # the residual stream's layers, the predictor: dense
    for g in strategy.groups:
        reader = masks[g.reader].reshape(masks[g.reader].shape[0], -1)
        kept = reader[0]
        assert torch.equal(reader, kept.expand_as(reader))  # whole columns
        assert int((~kept).sum()) == g.width // 2  # exactly the rate
        for p in g.producers:  # row r computes unit r % width (value and gate rows of a GLU)
            rows = masks[p].reshape(masks[p].shape[0], -1)
            assert torch.equal(rows[:, 0], kept.repeat(rows.shape[0] // g.width))
            assert torch.equal(rows, rows[:, :1].expand_as(rows))
    again = strategy.client_masks(ServerState(0, {}), {}, 3, 1)
    other = strategy.client_masks(ServerState(0, {}), {}, 3, 2)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert not torch.equal(masks[f"{FFN}.4.weight"], other[f"{FFN}.4.weight"])


@pytest.mark.parametrize(("rate", "rescale"), [(0.5, False), (0.5, True), (0.25, True), (0.1, True)])
def test_the_client_trains_the_full_model_with_those_units_dropped(
    rate: float, rescale: bool, noise_utterances: list[Utterance]
) -> None:
    strategy = _strategy(rate=rate, rescale=rescale)
    model = build_model("tiny", seed=3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = strategy.client_masks(ServerState(0, weights), {}, 2, 0)
    payload = extract(weights, masks, strategy.specs)
    dropped = sum(int((~m).sum()) for m in masks.values())
    floats = sum(t.numel() for t in payload.values() if t.is_floating_point())
    assert floats == sum(w.numel() for w in weights.values()) - dropped  # every dropped weight stays home
    dense_nbytes = payload_nbytes(extract(weights, {}, {}))
    assert payload_nbytes(payload) < dense_nbytes - (3 * dropped if rate >= 0.5 else 0)  # kept ids: < 1 B each
    client = build_client_model(build_model("tiny", seed=9), payload, strategy.specs, strategy.rescale_kept)
    assert {LiveBatchNorm1d, LiveJoiner} <= {type(m) for m in client.module.modules()}
    assert client.module.get_submodule(ATTN).num_heads == 2 - num_pruned(2, rate)  # rate 0.1: none of 2 dropped

    # The reference: the full model with the dropped units' reader columns zeroed and, with
    # rescaling, the kept ones multiplied by units / kept units (inverted dropout before the reader).
    reference = build_model("tiny", seed=9)
    scaled = dict(weights)
    for g in strategy.groups:
        keep = masks[g.reader]
        factor = g.width / int(keep.reshape(keep.shape[0], -1)[0].sum()) if rescale else 1.0
        scaled[g.reader] = weights[g.reader] * keep * factor
    reference.load_state_dict(scaled, strict=False)
    batch = WORKLOAD.collate(noise_utterances)
    for m in (client.module, reference):
        m.train()
    loss_client, loss_reference = WORKLOAD.loss_fn(client.module, batch), WORKLOAD.loss_fn(reference, batch)
    torch.testing.assert_close(loss_client, loss_reference, rtol=1e-5, atol=1e-6)

    # The upload scatters back to the kept units only; the weights themselves are never scaled.
    update = client_update(client, strategy.specs)
    values, held = expand(update, masks, strategy.specs, {n: w.shape for n, w in weights.items()})
    for g in strategy.groups:
        for name in (g.reader, *g.producers):
            assert torch.equal(held[name], masks[name])
            assert torch.equal(values[name][held[name]], weights[name][held[name]])


def test_each_unit_entry_is_averaged_over_the_clients_that_held_its_unit() -> None:
    # Client 0 uploads every entry + 1 (1 example), client 1 + 3 (3 examples), also the entries of
    # units they did not hold (as weight decay would move them). An entry of a unit both held moves
    # by (1 + 9) / 4 = 2.5, one held by one client by that client's shift, one held by none stays.
    config = ExperimentConfig.from_dict({"strategy": "fed_dropout", "model": "tiny",
                                         "fed_dropout": {"units": "hidden", "rate": 0.5}})
    strategy = make_strategy(config, build_model("tiny"))
    weights = model_state(build_model("tiny", seed=3))
    state = ServerState(1, weights)
    outcomes = []
    for client_id, delta, examples in ((0, 1.0, 1), (1, 3.0, 3)):
        update = dispatch(strategy, ServerState(1, {n: w + delta for n, w in weights.items()}), {}, 2, client_id)
        outcomes.append(ClientOutcome(client_id, update, examples, 0.0, 0.0, 0, 0, 0, 0))
    new = aggregate(strategy, config, state, {}, {}, outcomes, 2).weights
    shapes = {n: w.shape for n, w in weights.items()}
    held = [held_entries(strategy.groups, strategy.client_masks(state, {}, 2, c), shapes) for c in (0, 1)]
    entries = {n for g in strategy.groups for n in g.entries}
    assert entries == set(held[0]) == set(held[1])
    assert {"transcriber.output.bias", "predictor.output_layer_norm.weight", f"{FFN}.1.bias", f"{CONV}.0.bias",
            f"{CONV}.2.weight", f"{CONV}.2.bias", f"{CONV}.3.weight", f"{CONV}.3.bias", f"{CONV}.3.running_mean",
            f"{CONV}.3.running_var"} <= entries
    for name in entries:
        h0, h1 = held[0][name], held[1][name]
        shift = torch.where(h0 & h1, 2.5, torch.where(h0, 1.0, torch.where(h1, 3.0, 0.0)))
        if name != f"{ATTN}.in_proj_bias":  # 2 heads, 1 dropped: not every case occurs (tests/core/test_fed_dropout.py)
            assert bool((h0 & ~h1).any()) and bool((~h0 & ~h1).any()), name  # each case occurs
        torch.testing.assert_close(new[name], weights[name] + shift, rtol=0, atol=1e-6, msg=name)
    for name in (f"{FFN}.4.bias", f"{CONV}.5.bias", "joiner.linear.bias", "predictor.linear.bias",
                 f"{ATTN}.out_proj.bias"):
        torch.testing.assert_close(new[name], weights[name] + 2.5, rtol=0, atol=1e-6, msg=name)  # read by all


@pytest.mark.parametrize("units", ["rows", "hidden"])
def test_with_batch_statistics_the_server_holds_none_and_evaluates_by_the_batch(
    units: str, noise_utterances: list[Utterance]
) -> None:
    config = ExperimentConfig.from_dict({
        "strategy": "fed_dropout", "model": "tiny", "fed_dropout": {"units": units},
        "schedule": {"num_rounds": 1, "sparsify_rounds": 1, "refine_rounds": 0},
        "federated": {"clients_per_round": 2, "local": {"steps": 1, "batch_size": 2, "lr": 0.05}},
    })
    clients = [noise_utterances[:2], noise_utterances[1:]]
    state = simulate(WORKLOAD, clients, config).state
    assert state.round_num == 1 and not any(is_running_stat(n) for n in state.weights)

    # Evaluation computes what training does: the loss of the model in train mode on the one batch.
    model = WORKLOAD.build_model()
    model.load_state_dict(state.weights, strict=False)
    with torch.no_grad():
        train_mode_loss = float(WORKLOAD.loss_fn(model.train(), WORKLOAD.collate(noise_utterances)))
    assert evaluate(WORKLOAD, state, noise_utterances)["loss"] == pytest.approx(train_mode_loss, rel=1e-6)
    running = ServerState(1, {**state.weights, **{n: t for n, t in model_state(model).items() if is_running_stat(n)}})
    assert evaluate(WORKLOAD, running, noise_utterances)["loss"] != pytest.approx(train_mode_loss, rel=1e-3)


def test_with_running_statistics_the_server_keeps_them() -> None:
    config = ExperimentConfig.from_dict({"strategy": "fed_dropout", "model": "tiny",
                                         "fed_dropout": {"units": "hidden", "batch_norm": "running"}})
    strategy = make_strategy(config, build_model("tiny"))
    state = ServerState(0, model_state(build_model("tiny")))
    assert strategy.initialize(state, WORKLOAD, []) is state
    with pytest.raises(ValueError, match="fed_dropout.batch_norm='frozen' is not a kind of statistics: use one of "
                                         "batch, running"):
        FedDropoutConfig(batch_norm="frozen")


def test_client_share_counts_the_dropped_units_entries() -> None:
    # tiny, rate 0.25: each feed-forward module drops 16 of 64 hidden units (32 producer + 32 reader
    # entries each), the convolution module 8 of 32 channels (2 x 32 + 32), the joint 16 of 64
    # dimensions (32 + 29 symbols), the attention 1 of 2 heads (16 dimensions: q, k and v rows of 32
    # entries, out projection columns of 32).
    config = ExperimentConfig.from_dict(HIDDEN_TINY)
    model = build_model("tiny")
    dense = sum(p.numel() for p in model.parameters())
    assert client_share(config, model, 0.25) == (dense - 2 * 16 * 64 - 8 * 96 - 16 * 61 - 16 * 4 * 32) / dense
    assert client_share(config, model, 0.0) == 1.0


def test_client_share_counts_the_heads() -> None:
    # tiny's attention (2 heads of 16 dimensions, embed 32) at rate 0.5 drops 1 head: 3 x 16 rows
    # and 16 columns of 32 entries; keeping it dense (layer rate 0) sends them.
    model = build_model("tiny")
    dense = sum(p.numel() for p in model.parameters())
    with_heads = ExperimentConfig.from_dict(HIDDEN_TINY)
    without = ExperimentConfig.from_dict({**HIDDEN_TINY, "fed_dropout": {
        "units": "hidden", "layer_rates": [[f"{ATTN}.out_proj.weight", 0.0]]}})
    assert client_share(with_heads, model, 0.5) == client_share(without, model, 0.5) - 4 * 16 * 32 / dense
    assert client_share(with_heads, model, 0.1) == client_share(without, model, 0.1)  # 0.1 of 2 heads: none
    assert rate_for_share(with_heads, model, 0.8) < rate_for_share(without, model, 0.8)


def test_rate_for_share_is_the_smallest_rate_within_the_budget() -> None:
    config = ExperimentConfig.from_dict(HIDDEN_TINY)
    model = build_model("tiny")
    rate = rate_for_share(config, model, 0.8)
    assert client_share(config, model, rate) <= 0.8 < client_share(config, model, rate - 2**-16)
    with pytest.raises(ValueError, match=r"share=0.2 is below what a fed_dropout client with units='hidden' can "
                                         r"download \(0.\d+ of dense"):
        rate_for_share(config, model, 0.2)


def test_units_are_validated_before_any_work() -> None:
    with pytest.raises(ValueError, match="fed_dropout.units='neurons' is not a kind of unit: use one of rows, hidden"):
        FedDropoutConfig(units="neurons")
    with pytest.raises(ValueError, match=r"glob '\*ffn1.sequential.1.weight' matches no unit group's reader"):
        _strategy(layer_rates=[["*ffn1.sequential.1.weight", 0.2]])  # a producer: rates go by reader
    config = ExperimentConfig.from_dict({"strategy": "fed_dropout", "model": "tiny",
                                         "fed_dropout": {"units": "hidden"},
                                         "pruning": {"prunable": ["*self_attn.in_proj_weight"]}})
    with pytest.raises(ValueError, match="found no unit group"):
        make_strategy(config, build_model("tiny"))

"""The prediction network's LSTM run by torch.lstm (`FusedLSTM`), dense and on a client's live units."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torchaudio.models.rnnt import _CustomLSTM

from fedprune_core.masks import make_mask
from fedprune_core.prunable import find_prunable, from_matrices, matrices
from fedprune_core.speech.lstm import FusedLSTM
from fedprune_core.speech.model import ModelConfig, build_model, resolve_model_config
from fedprune_core.submodel import build_client_model, client_update, expand, extract, read_columns

PREDICTOR = "predictor.lstm_layers.0"


def _run(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, state: list[torch.Tensor] | None) -> dict:  # type: ignore[type-arg]
    x = x.detach().clone().requires_grad_()
    out, (h, c) = layer(x, state)
    ((out * grad).sum() + h.sum() + 2 * c.sum()).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return {"out": out, "h": h, "c": c, "x": x.grad, **grads}


@pytest.mark.parametrize("with_state", [False, True])
def test_fused_lstm_computes_what_torchaudios_lstm_computes(with_state: bool) -> None:
    torch.manual_seed(0)
    custom = _CustomLSTM(12, 20)
    fused = FusedLSTM.from_custom(copy.deepcopy(custom))
    assert {n for n, _ in fused.named_parameters()} == {"x2g.weight", "x2g.bias", "p2g.weight"}  # names kept
    x, grad = torch.randn(7, 3, 12), torch.randn(7, 3, 20)
    state = [torch.randn(3, 20), torch.randn(3, 20)] if with_state else None
    expected, got = _run(custom, x, grad, state), _run(fused, x, grad, state)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fused_lstm_keeps_only_its_inputs_for_backward() -> None:
    layer = FusedLSTM.from_custom(_CustomLSTM(12, 20))
    x = torch.randn(7, 3, 12, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x, None)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert sum(saved) <= x.numel() * x.element_size() + params + 2 * 3 * 20 * 4  # input, weights, zero h and c
    out.sum().backward()  # the layer runs again: gradients as usual
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_the_speech_models_lstm_is_fused_and_a_layer_norm_lstm_is_refused() -> None:
    assert isinstance(build_model("tiny").get_submodule(PREDICTOR), FusedLSTM)
    with pytest.raises(ValueError, match="layer_norm=True"):
        FusedLSTM.from_custom(_CustomLSTM(4, 6, layer_norm=True))


def _predictions(
    config: str | ModelConfig, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], client: nn.Module,
    g: torch.Generator,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked full model (seed 9, as the clients' own), random tokens, and the client's and the
    masked model's prediction network outputs on them."""
    reference = build_model(config, seed=9)
    reference.load_state_dict({n: w * masks[n] if n in masks else w for n, w in weights.items()}, strict=False)
    tokens = torch.randint(0, 29, (3, 6), generator=g)
    lengths = torch.full((3,), 6)
    return reference, tokens, client.predictor(tokens, lengths)[0], reference.predictor(tokens, lengths)[0]


def test_a_clients_lstm_computes_only_the_units_read_after_it() -> None:
    model = build_model("tiny", seed=3)  # LSTM of 64 units read by p2g and the output Linear
    specs = find_prunable(model, ("predictor.*",), "column")
    g = torch.Generator().manual_seed(1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: make_mask(torch.rand(s.shape, generator=g), 0.7, "column") for n, s in specs.items()}
    client = build_client_model(build_model("tiny", seed=9), extract(weights, masks, specs), specs)
    layer = client.module.get_submodule(PREDICTOR)
    assert isinstance(layer, FusedLSTM) and layer.units is not None

    recurrent = masks[f"{PREDICTOR}.p2g.weight"].any(0)
    read_after = masks["predictor.linear.weight"].any(0)
    assert layer.units.tolist() == (recurrent | read_after).nonzero().flatten().tolist()
    assert layer.units.numel() < 64  # 0.7 of each layer's columns pruned: some units are read by neither
    p2g_columns = read_columns(layer.p2g)
    assert p2g_columns is not None and p2g_columns.tolist() == recurrent.nonzero().flatten().tolist()
    width = layer.units.numel()
    assert layer._recurrent_weight(width).shape == (4 * width, width)  # the recurrence runs on live units

    reference, tokens, out, expected = _predictions("tiny", weights, masks, client.module, g)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the LSTM's outputs: the live units only, as in the full model; the output Linear reads its
    # columns among them, and the state (for decoding) is whole, zeros for units nothing reads
    embedded = reference.predictor.input_layer_norm(reference.predictor.embedding(tokens.T))
    full, (h_full, _) = reference.get_submodule(PREDICTOR)(embedded, None)
    compact, (h, _) = layer(embedded, None)
    read = recurrent | read_after
    assert layer.compact_output and compact.shape == (*full.shape[:-1], width)
    torch.testing.assert_close(compact, full[..., read], rtol=1e-5, atol=1e-6)
    output_columns = client.module.predictor.linear.c0
    assert output_columns.tolist() == torch.searchsorted(layer.units, read_after.nonzero().flatten()).tolist()
    torch.testing.assert_close(h[..., read], h_full[..., read], rtol=1e-5, atol=1e-6)
    assert h.shape == h_full.shape and not h[..., ~read].any()
    with pytest.raises(ValueError, match="keep_units_read_by runs once"):
        layer.keep_units_read_by(client.module.predictor.linear)

    # gradients: the dead units' gate rows get none, the live ones the full model's
    out.square().sum().backward()
    expected.square().sum().backward()
    x2g = layer.x2g
    rows = torch.cat([~read] * 4)
    assert x2g.w0.grad is not None and not x2g.w0.grad[rows].any() and x2g.w0.grad[~rows].abs().sum() > 0
    ref_grad = reference.get_parameter(f"{PREDICTOR}.x2g.weight").grad
    assert ref_grad is not None
    torch.testing.assert_close(x2g.w0.grad, ref_grad[:, x2g.c0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["column", "half_column"])
def test_a_stack_of_client_lstm_layers_equals_the_masked_full_stack(pattern: str) -> None:
    # layer 0's output is read by layer 1's x2g (renumbered among layer 0's live units), layer 1's by the Linear
    config = dataclasses.replace(resolve_model_config("tiny"), pred_layers=2)
    model = build_model(config, seed=3)
    specs = find_prunable(model, ("predictor.lstm_layers.*", "predictor.linear.weight"), pattern)
    g = torch.Generator().manual_seed(2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {}
    for n, spec in specs.items():
        parts = [make_mask(torch.rand(m.shape, generator=g), 0.7, pattern) for m in matrices(weights[n], spec)]
        masks[n] = from_matrices(parts, spec)
    client = build_client_model(build_model(config, seed=9), extract(weights, masks, specs), specs)
    layers = client.module.predictor.lstm_layers
    assert all(isinstance(layer, FusedLSTM) and layer.compact_output for layer in layers)
    reference, _, out, expected = _predictions(config, weights, masks, client.module, g)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = {n: p.grad for n, p in client.module.named_parameters() if p.grad is not None}
    shapes = {n: w.shape for n, w in weights.items() if n.startswith("predictor.")}
    values, held = expand(client_update(client, specs, grads), masks, specs, shapes)
    for n in shapes:
        p = reference.get_parameter(n)
        assert p.grad is not None
        h = held.get(n, torch.ones_like(p, dtype=torch.bool))
        torch.testing.assert_close(values[n][h], p.grad[h], rtol=1e-4, atol=1e-6)

"""Dead units on the speech model: a client that drops them computes and trains exactly what the
masked full model does, and downloads less."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune_core.masks import make_mask
from fedprune_core.prunable import every_pattern_weights, find_prunable, from_matrices, matrices
from fedprune_core.speech.model import build_model
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.submodel import (
    ChannelSlicedConv2d,
    SlicedMultiheadAttention,
    build_client_model,
    client_update,
    expand,
    extract,
)
from fedprune_core.units import (
    LiveBatchNorm1d,
    LiveDepthwiseConv1d,
    LiveJoiner,
    find_channel_groups,
    find_unit_groups,
    live_masks,
    live_units,
)

WORKLOAD = SpeechWorkload(model="tiny")


def _masks(model: nn.Module, pattern: str, sparsity: float, seed: int) -> tuple[dict, dict]:  # type: ignore[type-arg]
    names = ("*weight",) if pattern == "column" else every_pattern_weights(model)  # half patterns: even shapes
    specs = find_prunable(model, names, pattern)
    g = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    masks = {
        n: from_matrices([make_mask(torch.rand(m.shape, generator=g), sparsity, s.pattern, taps=s.taps)
                          for m in matrices(weights[n].detach(), s)], s)
        for n, s in specs.items()
    }  # fmt: skip
    return specs, masks


def test_the_speech_model_has_its_feed_forward_convolution_and_joint_units() -> None:
    model = build_model("tiny")
    specs = find_prunable(model, ("*weight",), "column")
    groups = {g.reader: g for g in find_unit_groups(model, specs)}
    ffn = "transcriber.conformer.conformer_layers.0.ffn1.sequential"
    conv = "transcriber.conformer.conformer_layers.0.conv_module.sequential"
    assert groups[f"{ffn}.4.weight"].producers == (f"{ffn}.1.weight",)
    assert groups[f"{conv}.5.weight"].per_unit == (f"{conv}.2", f"{conv}.3")
    assert groups["joiner.linear.weight"].producers == ("transcriber.output.weight",)
    assert len(groups) == 2 + 1 + 1  # two feed-forward modules, one convolution module, the joint
    assert specs[f"{ffn}.1.weight"].feeds == f"{ffn}.4.weight"
    # unstructured weights are not sliced: no group
    assert find_unit_groups(model, find_prunable(model, ("*weight",), "unstructured")) == ()


def test_the_subsampling_linear_prunes_the_convolutions_channels_under_column_patterns() -> None:
    model = build_model("tiny")  # 8 channels of 20 frequency bins each
    sub = "transcriber.subsampling"
    for pattern in ("column", "half_column"):
        specs = find_prunable(model, every_pattern_weights(model), pattern)
        assert specs[f"{sub}.linear.weight"].taps == 20
        assert specs[f"{sub}.conv.2.weight"].feeds == f"{sub}.linear.weight"
        assert [(g.reader, g.producers, g.width, g.taps) for g in find_channel_groups(model, specs)] == [
            (f"{sub}.linear.weight", (f"{sub}.conv.2.weight",), 8, 20)
        ]
        # not a hidden-unit group: Federated Dropout's hidden units stay the four of the other test
        assert all(g.taps == 1 for g in find_unit_groups(model, specs))
    for pattern in ("row", "half_row", "unstructured"):  # these prune no channel as a whole
        specs = find_prunable(model, every_pattern_weights(model), pattern)
        assert find_channel_groups(model, specs) == () and not specs[f"{sub}.conv.2.weight"].feeds


@pytest.mark.parametrize("pattern", ["column", "half_column"])
def test_a_client_without_dead_units_trains_exactly_the_masked_full_model(
    pattern: str, noise_utterances: list[Utterance]
) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", seed=3)
    specs, masks = _masks(model, pattern, 0.5, seed=1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    live = live_masks(masks, specs)
    ffn_in = "transcriber.conformer.conformer_layers.0.ffn1.sequential.1.weight"
    assert int(live[ffn_in].sum()) < int(masks[ffn_in].sum())  # rows of dead hidden units are gone

    payload = extract(weights, masks, specs)
    client = build_client_model(build_model("tiny", seed=9), payload, specs)
    kinds = {type(m) for m in client.module.modules()}
    assert {SlicedMultiheadAttention, LiveBatchNorm1d} <= kinds
    assert (LiveJoiner in kinds) == (pattern == "column")  # the joint output (29 rows) has no halves
    # the subsampling's second convolution trains its kept input channels, and the first computes only them;
    # it computes only the output channels its Linear reads, and the Linear takes them without a gather
    second = client.module.get_submodule("transcriber.subsampling.conv.2")
    read = live_units(masks["transcriber.subsampling.linear.weight"], 20)
    assert 0 < int(read.sum()) < 8
    assert isinstance(second, ChannelSlicedConv2d) and second.outputs is not None
    assert second.outputs.tolist() == read.nonzero().flatten().tolist()
    linear = client.module.get_submodule("transcriber.subsampling.linear")
    assert linear.num_blocks == 2 if pattern == "half_column" else linear.c0 is None
    depthwise_name = "transcriber.conformer.conformer_layers.0.conv_module.sequential.2"
    depthwise = client.module.get_submodule(depthwise_name)  # taps no live channel keeps are left out
    assert isinstance(depthwise, LiveDepthwiseConv1d)
    if f"{depthwise_name}.weight" in masks:  # half patterns leave its odd-sized kernel unpruned
        assert depthwise.taps is not None and 0 < depthwise.taps.numel() < depthwise.weight.shape[-1]
    else:
        assert pattern == "half_column" and depthwise.taps is None

    reference = build_model("tiny", seed=9)
    reference.load_state_dict({n: w * masks[n] if n in masks else w for n, w in weights.items()}, strict=False)
    batch = WORKLOAD.collate(noise_utterances)
    for m in (client.module, reference):
        m.train()
    loss_client, loss_reference = WORKLOAD.loss_fn(client.module, batch), WORKLOAD.loss_fn(reference, batch)
    torch.testing.assert_close(loss_client, loss_reference, rtol=1e-5, atol=1e-6)

    # one SGD step each (the reference's gradients masked): same weights where the client holds them
    for loss in (loss_client, loss_reference):
        loss.backward()
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for p in client.module.parameters():
            p -= 0.1 * p.grad
        for n, p in ref_params.items():
            p -= 0.1 * (p.grad * masks[n] if n in masks else p.grad)
    client.project()
    values, held = expand(client_update(client, specs), masks, specs, {n: w.shape for n, w in weights.items()})
    for n, w in weights.items():
        h = held.get(n, torch.ones_like(w, dtype=torch.bool))
        torch.testing.assert_close(values[n][h], ref_params[n].detach()[h], rtol=1e-4, atol=1e-6)
        assert torch.equal(held.get(n, h), live.get(n, h))  # the server averages what the client held
    # a dead unit's weights are exactly unchanged in the reference: dropping them lost nothing
    dead = masks[ffn_in] & ~live[ffn_in]
    assert torch.equal(ref_params[ffn_in].detach()[dead], weights[ffn_in][dead])
    # the batch norm's running statistics moved on the live channels only
    bn = "transcriber.conformer.conformer_layers.0.conv_module.sequential.3"
    units = live_units(masks["transcriber.conformer.conformer_layers.0.conv_module.sequential.5.weight"])
    ref_mean = reference.get_buffer(f"{bn}.running_mean")
    torch.testing.assert_close(client.module.get_buffer(f"{bn}.running_mean")[units], ref_mean[units])


def test_dropping_dead_units_shrinks_the_download() -> None:
    model = build_model("tiny")
    specs, masks = _masks(model, "column", 0.5, seed=2)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    with_units = extract(weights, masks, specs)
    without = extract(weights, masks, {n: s.__class__(**{**s.__dict__, "feeds": ""}) for n, s in specs.items()})
    ffn_in = "transcriber.conformer.conformer_layers.0.ffn1.sequential.1.weight"
    live_rows = int(live_units(masks[ffn_in.replace(".1.", ".4.")]).sum())
    assert with_units[f"{ffn_in}|w0"].shape[0] == live_rows < without[f"{ffn_in}|w0"].shape[0]
    assert sum(t.numel() for t in with_units.values()) < sum(t.numel() for t in without.values())

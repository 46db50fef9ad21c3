"""The payload: exact bytes on the wire, group ids and bits, extract then expand is the identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedprune_core.masks import PATTERNS
from fedprune_core.prunable import PrunableSpec, find_prunable
from fedprune_core.submodel import (
    SlicedLinear,
    build_client_model,
    client_update,
    expand,
    extract,
    groups_to_mask,
    mask_to_groups,
    pack_bits,
    payload_nbytes,
    unpack_bits,
)
from tests.core.submodel.common import Net, random_masks, seeded

# --- exact payload bytes -----------------------------------------------------------------------


def test_payload_bytes_of_a_sliced_linear_by_hand() -> None:
    fc = nn.Sequential(nn.Linear(4, 6))
    specs = find_prunable(fc, ("0.weight",), "column")
    weights = {n: p.detach() for n, p in fc.named_parameters()}
    mask = torch.tensor([True, False, True, False])[None, :].expand(6, 4)
    payload = extract(weights, {"0.weight": mask}, specs)
    shapes = {k: tuple(v.shape) for k, v in payload.items()}
    assert shapes == {"0.weight|w0": (6, 2), "0.weight|c0": (2,), "0.bias": (6,)}
    assert payload["0.weight|c0"].dtype == torch.int32 and payload["0.weight|c0"].tolist() == [0, 2]
    # down: kept block 6 x 2 float32 (48) + 2 int32 column ids (8) + dense bias 6 float32 (24)
    assert payload_nbytes(payload) == 48 + 8 + 24
    client = build_client_model(nn.Sequential(nn.Linear(4, 6)), payload, specs)
    assert payload_nbytes(client_update(client, specs)) == 48 + 24  # up: values only
    assert payload_nbytes(weights) == 96 + 24  # dense


def test_payload_bytes_of_half_row_and_of_row_by_hand() -> None:
    fc = nn.Sequential(nn.Linear(4, 6))
    specs = find_prunable(fc, ("0.weight",), "half_row")
    weights = {n: p.detach() for n, p in fc.named_parameters()}
    keep = torch.tensor(
        [[True, False], [True, True], [False, False], [False, True], [True, False], [False, False]]
    )
    mask = keep[:, :, None].expand(6, 2, 2).reshape(6, 4)
    payload = extract(weights, {"0.weight": mask}, specs)
    # left half: rows 0, 1, 4 x columns 0-1; right half: rows 1, 3 x columns 2-3 (each block spans
    # its half's columns, so no column indices travel)
    assert payload["0.weight|w0"].shape == (3, 2) and payload["0.weight|r0"].tolist() == [0, 1, 4]
    assert payload["0.weight|w1"].shape == (2, 2) and payload["0.weight|r1"].tolist() == [1, 3]
    assert "0.weight|c0" not in payload and "0.weight|c1" not in payload
    assert payload_nbytes(payload) == (6 + 4) * 4 + (3 + 2) * 4 + 24
    row_specs = find_prunable(fc, ("0.weight",), "row")
    row_payload = extract(weights, {"0.weight": keep[:, :1].expand(6, 4)}, row_specs)
    assert payload_nbytes(row_payload) == 3 * 4 * 4 + 3 * 4 + 24  # rows 0, 1, 4


def test_payload_bytes_of_masked_parameters_by_hand() -> None:
    conv = nn.Conv1d(1, 4, kernel_size=3, bias=False)  # (4, 1, 3) viewed as (4, 3)
    weights = {"weight": conv.weight.detach()}
    unstructured = find_prunable(conv, ("weight",), "unstructured")
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool).reshape(4, 1, 3)
    payload = extract(weights, {"weight": mask}, unstructured)
    # 6 kept float32 values (24) + 12 bits packed into 2 bytes
    assert payload["weight|b"].tolist() == [0b00111101, 0b00000100] and payload_nbytes(payload) == 24 + 2
    column = find_prunable(conv, ("weight",), "column")
    mask = torch.tensor([True, False, True])[None, :].expand(4, 3).reshape(4, 1, 3)
    payload = extract(weights, {"weight": mask}, column)
    assert payload["weight|g"].tolist() == [0, 2] and payload_nbytes(payload) == 8 * 4 + 2 * 4


def test_a_convolutions_kept_input_channels_travel_as_one_group_id_each() -> None:
    conv = nn.Conv2d(3, 2, kernel_size=2, bias=False)  # (2, 3, 2, 2): 4 taps per input channel
    specs = find_prunable(conv, ("weight",), "column")
    mask = torch.tensor([True, False, True])[None, :, None, None].expand(2, 3, 2, 2)
    payload = extract({"weight": conv.weight.detach()}, {"weight": mask}, specs)
    # 16 kept float32 values (two channels x two filters x four taps) + two int32 channel ids
    assert payload["weight|g"].tolist() == [0, 2] and payload_nbytes(payload) == 16 * 4 + 2 * 4
    assert torch.equal(groups_to_mask(payload["weight|g"], specs["weight"]), mask)
    one_tap = mask.clone()
    one_tap[:, 0, 0, 0] = False  # part of channel 0 only
    with pytest.raises(ValueError, match=r"the mask of weight keeps part of a column group \(taps=4\)"):
        extract({"weight": conv.weight.detach()}, {"weight": one_tap}, specs)


# --- extract -> train nothing -> expand --------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(PATTERNS), st.floats(0.0, 0.9), st.integers(0, 2**16), st.sampled_from([2, 4]))
def test_extract_then_expand_without_training_is_the_identity(
    pattern: str, sparsity: float, seed: int, width: int
) -> None:
    model = seeded(Net(width), seed)
    specs = find_prunable(model, ("*weight",), pattern)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_masks(weights, specs, sparsity, seed)
    payload = extract(weights, masks, specs)
    client = build_client_model(seeded(Net(width), seed + 1), payload, specs)
    update = client_update(client, specs)
    values, held = expand(update, masks, specs, {n: w.shape for n, w in weights.items()})
    assert set(held) == set(masks)
    for name, w in weights.items():
        if name in masks:
            assert torch.equal(held[name], masks[name])
            assert torch.equal(values[name], w * masks[name])
        else:
            assert torch.equal(values[name], w)
    sliced = [n for n, s in specs.items() if s.linear]
    assert (pattern != "unstructured") == all(
        isinstance(client.module.get_submodule(n.removesuffix(".weight").replace("in_proj_weight", "in_proj")),
                   SlicedLinear)
        for n in sliced
    )


def test_group_ids_and_bits_round_trip() -> None:
    spec = PrunableSpec("attn.in_proj_weight", (6, 4), 3, False, "column")
    mask = torch.tensor([[1, 0, 1, 0]] * 2 + [[0, 0, 0, 1]] * 2 + [[1, 1, 0, 0]] * 2, dtype=torch.bool)
    ids = mask_to_groups(mask, spec)
    assert ids.dtype == torch.int32 and ids.tolist() == [0, 2, 7, 8, 9]  # 4 columns per block
    assert torch.equal(groups_to_mask(ids, spec), mask)
    bits = torch.rand(3, 5, 7) < 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), (3, 5, 7)), bits)
    assert pack_bits(bits).numel() == (105 + 7) // 8

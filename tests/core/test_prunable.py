"""Which parameters are pruned and how each is viewed as 2-D matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune_core.prunable import PrunableSpec, find_prunable, from_matrices, matrices


class Net(nn.Module):
    """A Linear, a Conv1d (rank 3), attention with fused q/k/v, a norm and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv1d(6, 4, kernel_size=3)
        self.attn = nn.MultiheadAttention(4, 2)
        self.norm = nn.LayerNorm(4)


def test_globs_select_parameters_and_1d_tensors_only_when_asked() -> None:
    specs = find_prunable(Net(), ("*weight",), "column")
    assert set(specs) == {
        "embed.weight",
        "fc.weight",
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    }
    with_1d = find_prunable(Net(), ("fc.*", "norm.*"), "column", include_1d=True)
    assert set(with_1d) == {"fc.weight", "fc.bias", "norm.weight", "norm.bias"}
    assert with_1d["fc.bias"].pattern == "unstructured" and with_1d["fc.bias"].matrix_shape == (6, 1)
    assert with_1d["fc.weight"].pattern == "column"


def test_specs_describe_shapes_splits_and_sliceability() -> None:
    specs = find_prunable(Net(), ("*weight",), "row")
    assert specs["fc.weight"] == PrunableSpec("fc.weight", (6, 4), 1, True, "row")
    assert specs["conv.weight"].linear is False and specs["conv.weight"].matrix_shape == (4, 18)
    assert specs["conv.weight"].numel == 72
    attn = specs["attn.in_proj_weight"]
    # a plain attention's projections: a client runs them as sliced layers (SlicedMultiheadAttention)
    assert (attn.splits, attn.matrix_shape, attn.linear) == (3, (4, 4), True)
    assert specs["attn.out_proj.weight"].linear is True
    other = nn.ModuleDict({"a": nn.MultiheadAttention(4, 2, batch_first=True)})
    batch_first = find_prunable(other, ("*weight",), "row")
    assert not batch_first["a.in_proj_weight"].linear and not batch_first["a.out_proj.weight"].linear
    assert specs["embed.weight"].linear is False


def test_convolutions_with_several_input_channels_group_their_taps() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.Conv1d(6, 6, 5, groups=6),
                          nn.Conv1d(6, 4, 1), nn.Conv1d(4, 4, 3, groups=2), nn.ConvTranspose1d(4, 4, 3),
                          nn.Linear(4, 4))
    specs = find_prunable(model, ("*weight",), "column")
    # one input channel (per group): a column per tap; a transposed conv's dim 0 is its input
    assert [specs[f"{i}.weight"].taps for i in range(7)] == [1, 9, 1, 1, 3, 1, 1]


def test_pointwise_conv1d_is_sliceable_other_convs_are_not() -> None:
    model = nn.Sequential(nn.Conv1d(4, 6, 1), nn.Conv1d(6, 6, 1, groups=2), nn.Conv1d(6, 6, 1, stride=2),
                          nn.Conv1d(6, 6, 1, padding=1), nn.Conv1d(6, 4, 3))
    specs = find_prunable(model, ("*weight",), "column")
    assert [specs[f"{i}.weight"].linear for i in range(5)] == [True, False, False, False, False]


def test_a_glob_matching_nothing_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError) as err:
        find_prunable(Net(), ("*weight", "decoder.*"), "column")
    assert "'decoder.*' matches no parameter" in str(err.value) and "embed.weight" in str(err.value)


@pytest.mark.parametrize(("pattern", "glob"), [
    ("half_row", "embed.weight"),  # (5, 4): 4 columns
    ("half_row", "conv.weight"),  # viewed as (4, 18)
    ("half_column", "conv.weight"),
    ("half_column", "attn.in_proj_weight"),  # three (4, 4) blocks
])  # fmt: skip
def test_half_patterns_accept_even_sizes(pattern: str, glob: str) -> None:
    assert glob in find_prunable(Net(), (glob,), pattern)


def test_half_patterns_on_odd_sizes_name_the_parameter_and_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        find_prunable(Net(), ("*weight",), "half_column")
    message = str(err.value)
    assert "embed.weight of shape (5, 4)" in message and "odd number of rows (5)" in message
    assert "use pattern 'row' or 'column'" in message and "exclude it from prunable" in message


def test_fused_projection_with_odd_block_rows_is_rejected() -> None:
    # in_proj of width 6 is three (6, 6) blocks: fine for half_column; width 3 gives blocks of 3 rows
    assert "attn.in_proj_weight" in find_prunable(
        nn.ModuleDict({"attn": nn.MultiheadAttention(6, 2)}), ("*in_proj_weight",), "half_column"
    )
    with pytest.raises(ValueError, match=r"attn.in_proj_weight of shape \(3, 3\).*odd number of rows \(3\)"):
        find_prunable(
            nn.ModuleDict({"attn": nn.MultiheadAttention(3, 1)}), ("*in_proj_weight",), "half_column"
        )


def test_matrices_round_trip_for_rank_3_and_fused_blocks() -> None:
    conv = torch.arange(24.0).reshape(4, 2, 3)
    spec = PrunableSpec("conv.weight", (4, 2, 3), 1, False, "column")
    (m,) = matrices(conv, spec)
    assert m.shape == (4, 6) and torch.equal(m[1], torch.arange(6.0, 12.0))
    assert torch.equal(from_matrices([m], spec), conv)
    fused = torch.arange(24.0).reshape(6, 4)
    spec3 = PrunableSpec("attn.in_proj_weight", (6, 4), 3, False, "column")
    q, k, v = matrices(fused, spec3)
    assert torch.equal(k, fused[2:4])
    assert torch.equal(from_matrices([q, k, v], spec3), fused)

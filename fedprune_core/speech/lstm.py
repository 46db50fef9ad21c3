"""The prediction network's LSTM, run by torch's LSTM kernel instead of a Python loop.

torchaudio's RNN-T prediction network (``_Predictor``) builds each LSTM layer (``_CustomLSTM``)
from two ``nn.Linear`` layers, ``x2g`` (input to the four gates, with the bias) and ``p2g``
(previous output to the gates), and steps through the target positions in Python: about fourteen
operations a position forward and as many autograd nodes backward. At `small`'s batch 16 and 36
target positions a forward and backward took 31-33 ms, most of it per-operation overhead, where
``torch.lstm`` with the same weights (oneDNN's LSTM on a CPU) took 10-12 ms. That kernel keeps a
workspace for backward (9.6 MB at that size, where the Python loop kept 6.1 MB of activations), so
`FusedLSTM` keeps only its inputs and runs the layer again in backward (``torch.utils.checkpoint``):
17 ms, and 9 MB less than the workspace.

`FusedLSTM` keeps the two layers, their parameters and names (checkpoints, masks and scores are
unchanged, and a client still swaps them for sliced ones) and passes their weights to
``torch.lstm``: a sliced ``x2g`` that reads some input features gets those features gathered once
for the whole sequence; any other sliced layer passes its blocks placed in a zero matrix
(`fedprune_core.submodel.linear_weight`). The gates are torch's order, which is torchaudio's
(input, forget, cell, output).

Live units. Column pruning removes inputs of the layers that read a layer's output: ``p2g`` of the
same layer and the layer after it (the next LSTM layer's ``x2g``, or the prediction network's
output ``Linear``). A unit that neither reads is dead: no weight that computes it can change the
loss, and its gradients are exactly zero. A client's `FusedLSTM` runs on the live units only
(`FusedLSTM.keep_units_read_by`, which `fedprune_core.submodel.build_client_model` has the
prediction network call once its layers are sliced): the recurrence's weight shrinks from
``4H x H`` to ``4H' x H'``, and the layer's output holds the live units only, the layer after it
reading its columns among them (its last state, for decoding, is whole: zeros for dead units). The
dead units' weights stay in the client's layers with zero gradients, which leaves them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchaudio.models.rnnt import _CustomLSTM

from fedprune_core.submodel import SlicedLinear, linear_weight, read_columns, take_columns


class FusedLSTM(nn.Module):
    """One LSTM layer computing what ``_CustomLSTM`` without layer norm computes, with ``torch.lstm``.

    Attributes:
        x2g: ``Linear(input_dim, 4 * hidden_dim)`` with bias (or its sliced replacement).
        p2g: ``Linear(hidden_dim, 4 * hidden_dim)`` without bias (or its sliced replacement).
        hidden_dim: units of the layer.
        units: the live units the layer computes (long, sorted), or None for all of them.
    """

    units: torch.Tensor | None
    rows: torch.Tensor | None
    recurrent_columns: torch.Tensor | None

    def __init__(self, x2g: nn.Module, p2g: nn.Module, hidden_dim: int) -> None:
        super().__init__()
        self.x2g, self.p2g, self.hidden_dim = x2g, p2g, hidden_dim
        self.compact_output = False
        for name in ("units", "rows", "recurrent_columns"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_custom(cls, layer: _CustomLSTM) -> FusedLSTM:
        """The same layer, sharing ``layer``'s parameters.

        Raises:
            ValueError: ``layer`` normalises its gates or cells, which ``torch.lstm`` does not.
        """
        if not (isinstance(layer.g_norm, nn.Identity) and isinstance(layer.c_norm, nn.Identity)):
            raise ValueError("an LSTM layer with layer_norm=True has no torch.lstm equivalent: keep the _CustomLSTM")
        return cls(layer.x2g, layer.p2g, layer.hidden_dim)

    def keep_units_read_by(self, reader: nn.Module) -> None:
        """Compute only the units that ``p2g`` or ``reader`` (the layer reading this one's output)
        reads an input of; all of them when either reads every input.

        Sets `units`, the gate rows that compute them (`rows`) and, for a ``p2g`` of one column
        block, where its columns sit among the units (`recurrent_columns`). When some units are
        dead the layer's output holds the live units only, and ``reader``'s columns are renumbered
        among them (its blocks read the same features, without the dead units' zeros being
        written, kept and gathered from).

        Raises:
            ValueError: called a second time (``reader``'s columns are already renumbered).
        """
        if self.compact_output:
            raise ValueError("this LSTM layer already emits its live units only: keep_units_read_by runs once")
        self.units = self.rows = self.recurrent_columns = None
        recurrent, after = read_columns(self.p2g), read_columns(reader)
        if recurrent is None or after is None:
            return
        live = torch.zeros(self.hidden_dim, dtype=torch.bool)
        live[recurrent] = True
        live[after] = True
        live[0] |= not bool(live.any())  # torch.lstm needs a unit: one that nothing reads
        if bool(live.all()):
            return
        units = live.nonzero().flatten()
        self.units = units
        self.rows = torch.cat([units + gate * self.hidden_dim for gate in range(4)])
        block = _column_block(self.p2g)
        if block is not None:
            self.recurrent_columns = torch.searchsorted(units, block[0])
        assert isinstance(reader, SlicedLinear)  # read_columns: a sliced layer whose every block has columns
        for i in range(reader.num_blocks):
            setattr(reader, f"c{i}", torch.searchsorted(units, getattr(reader, f"c{i}")))
        self.compact_output = True

    def forward(
        self, input: torch.Tensor, state: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(T, B, input_dim)`` -> ``(T, B, hidden_dim)`` outputs (``(T, B, len(units))`` when
        `compact_output`) and the last ``[h, c]``, each ``(B, hidden_dim)``; ``state`` is the
        ``[h, c]`` to start from (None: zeros)."""
        units, hidden = self.units, self.hidden_dim
        if state is None:
            width = hidden if units is None else units.numel()
            h = c = input.new_zeros(1, input.shape[1], width)
        else:
            h, c = state[0].unsqueeze(0), state[1].unsqueeze(0)
            if units is not None:
                h, c = h.index_select(-1, units), c.index_select(-1, units)
        if torch.is_grad_enabled():  # keep the inputs only: the layer runs again in backward
            out, h_n, c_n = checkpoint(self._run, input, h, c, use_reentrant=False)
        else:
            out, h_n, c_n = self._run(input, h, c)
        return out, [h_n[0], c_n[0]]

    def _run(self, input: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The layer from ``(1, B, width)`` initial states on the computed units: outputs ``(T, B,
        hidden_dim)`` (the computed units only when `compact_output`), last ``h`` and ``c`` ``(1, B,
        hidden_dim)`` (zeros for units not computed)."""
        units, rows, hidden = self.units, self.rows, self.hidden_dim
        block = _column_block(self.x2g)
        if block is not None:  # its kept input features, gathered once for the whole sequence
            cols, w_ih, b_ih = block
            input = take_columns(input, cols)
        else:
            w_ih, b_ih = linear_weight(self.x2g, input.shape[-1])
        b_ih = w_ih.new_zeros(4 * hidden) if b_ih is None else b_ih
        if rows is not None:
            w_ih, b_ih = w_ih.index_select(0, rows), b_ih.index_select(0, rows)
        params = [w_ih, self._recurrent_weight(h.shape[-1]), b_ih, b_ih.new_zeros(b_ih.shape)]
        out = torch.lstm(input, (h, c), params, True, 1, 0.0, torch.is_grad_enabled(), False, False)
        if units is None:
            return out
        outputs, h_n, c_n = out
        return (outputs if self.compact_output else _expand(outputs, units, hidden),
                _expand(h_n, units, hidden), _expand(c_n, units, hidden))

    def _recurrent_weight(self, width: int) -> torch.Tensor:
        """``p2g``'s weight on the computed units: ``(4 * width, width)``."""
        units, rows = self.units, self.rows
        block = _column_block(self.p2g)
        if block is None:
            weight = linear_weight(self.p2g, self.hidden_dim)[0]
            return weight if units is None or rows is None else weight.index_select(0, rows).index_select(1, units)
        cols, weight, _ = block
        kept = weight if rows is None else weight.index_select(0, rows)
        at = cols if self.recurrent_columns is None else self.recurrent_columns
        return kept.new_zeros(kept.shape[0], width).index_copy(1, at, kept)


def _column_block(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(columns, weight, bias)`` of a `SlicedLinear` that is one block of whole rows reading some
    columns (a column pattern's), unscaled, with full outputs; None for any other layer."""
    if not (isinstance(layer, SlicedLinear) and layer.num_blocks == 1 and layer.tiled and layer.scale is None):
        return None
    cols: torch.Tensor | None = layer.c0  # type: ignore[assignment]
    weight: torch.Tensor = layer.w0  # type: ignore[assignment]
    if cols is None or layer.bias_index is not None:
        return None
    return cols, weight, layer.bias


def _expand(x: torch.Tensor, units: torch.Tensor, width: int) -> torch.Tensor:
    """``(..., len(units))`` -> ``(..., width)``, zeros outside ``units``."""
    return x.new_zeros(*x.shape[:-1], width).index_copy(-1, units, x)


def fuse_lstm_layers(layers: nn.ModuleList) -> None:
    """Replace every ``_CustomLSTM`` without layer norm in ``layers`` by a `FusedLSTM` sharing its parameters."""
    for i, layer in enumerate(layers):
        if isinstance(layer, _CustomLSTM) and isinstance(layer.g_norm, nn.Identity):
            layers[i] = FusedLSTM.from_custom(layer)


def keep_live_units(layers: nn.ModuleList, output: nn.Module) -> None:
    """Have each `FusedLSTM` of a stack compute the units that the next layer (``output`` after the
    last) reads (see `FusedLSTM.keep_units_read_by`)."""
    readers = [*(getattr(layer, "x2g", None) for layer in layers[1:]), output]
    for layer, reader in zip(layers, readers, strict=True):
        if isinstance(layer, FusedLSTM) and reader is not None:
            layer.keep_units_read_by(reader)

"""Conformer-Transducer built from torchaudio blocks, as in Federated Pruning (Lin et al., Interspeech 2022).

Encoder: a two-layer strided ``Conv2d`` front end (time and frequency subsampled by 4), a
``Linear`` into the model width, ``torchaudio.models.Conformer`` and a ``Linear`` into the joint
width. Prediction network and joiner: torchaudio's RNN-T ``_Predictor`` (embedding, LSTM built
from ``nn.Linear``, projection) and ``_Joiner``, assembled by ``torchaudio.models.RNNT`` so that
``torchaudio.models.RNNTBeamSearch`` decodes it unchanged. The LSTM layers run by ``torch.lstm``
(`fedprune_core.speech.lstm.FusedLSTM`: same parameters, no Python loop over target positions).

Every ``nn.Linear`` is called through its ``forward``, so a submodel can swap it for a sliced
one; ``nn.MultiheadAttention`` keeps its fused q/k/v ``in_proj_weight``. The convolution modules'
depthwise ``Conv1d`` layers become `fedprune_core.depthwise.DepthwiseConv1d` (same parameters,
summed tap by tap: faster on a CPU, and a client skips the taps its mask prunes).

``paper`` is Conformer-L of Gulati et al. (Interspeech 2020) as used by Lin et al.: 17 blocks of
width 512, 8 heads, a 640-wide prediction network and a 2048-wide joint (the published kernel of
32 is rounded to 31 because torchaudio needs an odd kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchaudio.models import RNNT, Conformer
from torchaudio.models.rnnt import _Joiner, _Predictor, _Transcriber

from fedprune_core.depthwise import DepthwiseConv1d
from fedprune_core.prunable import ChannelReader
from fedprune_core.speech.lstm import fuse_lstm_layers, keep_live_units
from fedprune_core.speech.text import CharVocabulary
from fedprune_core.submodel import ChannelSlicedConv2d


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a Conformer-Transducer.

    Attributes:
        n_mels: Input feature width.
        subsampling_channels: Channels of the two strided ``Conv2d`` layers.
        d_model: Conformer width.
        num_blocks: Conformer blocks.
        num_heads: Attention heads (must divide ``d_model``).
        ffn_dim: Hidden width of each Conformer feed-forward module.
        conv_kernel: Depthwise convolution kernel (odd).
        pred_embedding_dim: Prediction network symbol embedding width.
        pred_hidden_dim: Prediction network LSTM width.
        pred_layers: Prediction network LSTM layers.
        joint_dim: Joint network width.
        num_symbols: Output classes, blank included.
        dropout: Dropout in the Conformer and prediction network. Presets use 0: ``nn.Dropout``
            draws from torch's global RNG, which would break seeded reproducibility.
    """

    n_mels: int = 80
    subsampling_channels: int = 32
    d_model: int = 144
    num_blocks: int = 4
    num_heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 15
    pred_embedding_dim: int = 128
    pred_hidden_dim: int = 256
    pred_layers: int = 1
    joint_dim: int = 256
    num_symbols: int = CharVocabulary().size
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "dropout" and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name}={getattr(self, f.name)} must be > 0")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}: e.g. 4 for 144")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel={self.conv_kernel} must be odd: torchaudio pads it symmetrically")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        subsampling_channels=8,
        d_model=32,
        num_blocks=1,
        num_heads=2,
        ffn_dim=64,
        conv_kernel=7,
        pred_embedding_dim=32,
        pred_hidden_dim=64,
        joint_dim=64,
    ),
    # Sized for the `digits` corpus: learns it in a few minutes of federated rounds on a CPU, also at
    # half the parameters per client (the `demo` experiment preset).
    "demo": ModelConfig(
        subsampling_channels=16,
        d_model=64,
        num_blocks=1,
        num_heads=2,
        ffn_dim=128,
        conv_kernel=7,
        pred_embedding_dim=64,
        pred_hidden_dim=128,
        joint_dim=128,
    ),
    "small": ModelConfig(),
    "paper": ModelConfig(
        subsampling_channels=512,
        d_model=512,
        num_blocks=17,
        num_heads=8,
        ffn_dim=2048,
        conv_kernel=31,
        pred_embedding_dim=640,
        pred_hidden_dim=640,
        joint_dim=2048,
    ),
}


def subsampled_length(length: torch.Tensor) -> torch.Tensor:
    """Frames left after two stride-2 convolutions with padding 1: ``ceil(ceil(T / 2) / 2)``."""
    return ((length + 1) // 2 + 1) // 2


class _ConvReLUPair(torch.autograd.Function):
    """``relu(conv2(relu(conv1(x))))`` keeping only ``x`` and the output for backward.

    The first layer's output is the largest activation of the subsampling (at ``small``'s batch
    16: 10.3 MB, four times the output, the same for a dense and a pruned client); backward
    computes it again from ``x`` (one forward of the first convolution, 1-channel input) instead
    of keeping it. Gradients go through ``aten.convolution_backward`` and
    ``aten.threshold_backward``, the kernels autograd itself calls, so they equal autograd's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
        b2: torch.Tensor | None, convs: tuple[nn.Conv2d, nn.Conv2d],
    ) -> torch.Tensor:
        first, second = convs
        out = _conv_relu(_conv_relu(x, w1, b1, first), w2, b2, second)
        ctx.convs = convs
        ctx.save_for_backward(x, w1, b1, w2, b2, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, b1, w2, b2, out = ctx.saved_tensors
        first, second = ctx.convs
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        hidden = _conv_relu(x, w1, b1, first)
        grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grad_hidden, grad_w2, grad_b2 = _conv2d_backward(
            grad, hidden, w2, b2, second, (need_x or need_w1 or need_b1, need_w2, need_b2))
        grad_x = grad_w1 = grad_b1 = None
        if grad_hidden is not None:
            grad = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)
            grad_x, grad_w1, grad_b1 = _conv2d_backward(grad, x, w1, b1, first, (need_x, need_w1, need_b1))
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def _conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias))`` with ``conv``'s geometry."""
    return F.relu(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def _conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``conv2d(x, weight, bias)`` (``conv``'s geometry) for the inputs in ``need``."""
    bias_sizes = None if bias is None else list(bias.shape)
    grads = torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
        conv.groups, [need[0], need[1], need[2] and bias is not None])
    return tuple(g if n else None for g, n in zip(grads, need, strict=True))  # type: ignore[return-value]


class SubsamplingConvs(nn.Sequential):
    """``Conv2d, ReLU, Conv2d, ReLU`` (parameters named as in ``nn.Sequential``) that, when training,
    computes the first layer's output again in backward instead of keeping it (`_ConvReLUPair`).

    In a client whose second layer trains only its kept input channels (`ChannelSlicedConv2d`, which
    also computes only the output channels the subsampling's Linear reads), the first computes only
    those channels: the others are dead (nothing else reads them; their weights get zero gradient,
    as in the masked full model). Without gradients (evaluation, FLOP counting)
    it runs its layers one by one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self[0], self[2]
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in (x, *self.parameters())):
            return super().forward(x)
        assert isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d)
        w1, b1, b2 = first.weight, first.bias, second.bias
        if isinstance(second, ChannelSlicedConv2d):  # a client's: the first computes only the channels read
            w1 = w1.index_select(0, second.channels)
            b1 = None if b1 is None else b1.index_select(0, second.channels)
            b2 = second.live_bias()
        out: torch.Tensor = _ConvReLUPair.apply(x, w1, b1, second.weight, b2, (first, second))
        return out


class ConvSubsampling(nn.Module):
    """Two ``Conv2d(3x3, stride 2) + ReLU`` layers and a ``Linear`` to ``d_model`` (time / 4)."""

    def __init__(self, n_mels: int, channels: int, d_model: int) -> None:
        super().__init__()
        self.conv = SubsamplingConvs(channels)
        self.frequencies = int(subsampled_length(torch.tensor(n_mels)))
        self.linear = nn.Linear(channels * self.frequencies, d_model)

    def channel_readers(self) -> tuple[ChannelReader, ...]:
        """The Linear reads the second convolution's output channel by channel, ``frequencies``
        features each: under the column patterns it is pruned by whole channels, and a client's
        second convolution computes only the channels it reads."""
        return (ChannelReader("conv.2.weight", "linear.weight", self.frequencies),)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(B, T, F)`` features to ``(B, ceil(T/4), d_model)`` and subsampled lengths."""
        x = self.conv(features.unsqueeze(1))  # (B, C, T', F'), kept by the ReLU for backward
        # a client's sliced Linear can keep x instead of a gathered copy of its flattening
        reads_from = getattr(self.linear, "forward_from", None)
        out = reads_from(x, _frames_first) if reads_from else self.linear(_frames_first(x))
        return out, subsampled_length(lengths)


def _frames_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, T', F')`` -> ``(B, T', C * F')``."""
    return x.permute(0, 2, 1, 3).flatten(2)


class ConformerEncoder(nn.Module, _Transcriber):
    """Transcription network: subsampling, Conformer blocks, projection to the joint width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.subsampling = ConvSubsampling(config.n_mels, config.subsampling_channels, config.d_model)
        self.conformer = Conformer(
            input_dim=config.d_model,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_blocks,
            depthwise_conv_kernel_size=config.conv_kernel,
            dropout=config.dropout,
        )
        self.output = nn.Linear(config.d_model, config.joint_dim)
        for layer in self.conformer.conformer_layers:  # same parameters, computed tap by tap
            layer.conv_module.sequential[2] = DepthwiseConv1d.from_conv(layer.conv_module.sequential[2])

    def forward(self, input: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``(B, T, n_mels)`` features into ``(B, T', joint_dim)``, ``T' = ceil(T / 4)``.

        Returns:
            Encodings and ``(B,)`` valid lengths after subsampling.
        """
        x, lengths = self.subsampling(input, lengths)
        x, lengths = self.conformer(x, lengths)
        return self.output(x), lengths

    def infer(
        self, input: torch.Tensor, lengths: torch.Tensor, states: list[list[torch.Tensor]] | None
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
        """Not supported: this encoder attends over the whole utterance (no streaming)."""
        raise NotImplementedError("ConformerEncoder is full-context: call forward(), not infer()")


class Joiner(_Joiner):
    """torchaudio's joint network, with its inputs and hidden layer exposed so a loss can compute
    them again in backward instead of keeping them."""

    def forward(
        self, source_encodings: torch.Tensor, source_lengths: torch.Tensor, target_encodings: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` and ``(B, U, D)`` encodings -> ``(B, T, U, V)`` logits, and both lengths."""
        return self.linear(self.hidden(source_encodings, target_encodings)), source_lengths, target_lengths

    def hidden(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(T, D)`` source and ``(U, D)`` target encodings -> ``(T, U, D)`` activations."""
        source, target = self.inputs(source, target)
        return self.activation(source.unsqueeze(-2) + target.unsqueeze(-3))

    def inputs(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two encodings the joint adds, each frame to each target position."""
        return source, target


class Predictor(_Predictor):
    """torchaudio's prediction network (embedding, LSTM, projection) with its LSTM layers run by
    `fedprune_core.speech.lstm.FusedLSTM` (same parameters and names)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        fuse_lstm_layers(self.lstm_layers)

    def keep_live_units(self) -> None:
        """Once a client sliced its layers: each LSTM layer computes only the units read after it."""
        keep_live_units(self.lstm_layers, self.linear)


class ConformerTransducer(RNNT):
    """A ``torchaudio.models.RNNT`` with a :class:`ConformerEncoder`; ``config`` records its sizes."""

    def __init__(self, config: ModelConfig) -> None:
        predictor = Predictor(
            num_symbols=config.num_symbols,
            output_dim=config.joint_dim,
            symbol_embedding_dim=config.pred_embedding_dim,
            num_lstm_layers=config.pred_layers,
            lstm_hidden_dim=config.pred_hidden_dim,
            lstm_dropout=config.dropout,
        )
        super().__init__(ConformerEncoder(config), predictor, Joiner(config.joint_dim, config.num_symbols))
        self.config = config


def resolve_model_config(name_or_config: str | ModelConfig) -> ModelConfig:
    """Look a preset up by name, or pass a config through."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    if name_or_config not in MODEL_PRESETS:
        raise ValueError(f"model {name_or_config!r} is not a preset: use one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name_or_config]


def build_model(name_or_config: str | ModelConfig, seed: int = 0) -> ConformerTransducer:
    """Build a Conformer-Transducer with weights initialised from ``seed``.

    torch modules initialise from the global RNG; construction runs inside ``fork_rng`` with that
    RNG seeded, so the weights depend on ``seed`` only and the caller's RNG state is untouched.

    Args:
        name_or_config: A key of :data:`MODEL_PRESETS` or a :class:`ModelConfig`.
        seed: Initialisation seed.
    """
    config = resolve_model_config(name_or_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConformerTransducer(config)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())

"""The speech workload of Federated Pruning (Lin et al., Interspeech 2022): Conformer-Transducer ASR.

One object bundles what the federated loop needs from a workload: build the model, collate
utterances into batches, the transducer loss, one client's local training (through
:func:`fedprune_core.training.train_local`) and evaluation by WER and CER.

The loss is the RNN-T negative log-likelihood (:mod:`fedprune_core.speech.transducer`:
the value of ``torchaudio.functional.rnnt_loss`` at a quarter of its CPU time) summed over the
batch and divided by the number of target characters: nats per character, comparable across
batch compositions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torchaudio.models import RNNT

from fedprune_core.speech.decode import beam_decode, greedy_decode
from fedprune_core.speech.features import FeatureConfig, SpecAugmentConfig, log_mel, spec_augment
from fedprune_core.speech.metrics import char_error_rate, word_error_rate
from fedprune_core.speech.model import ConformerTransducer, ModelConfig, build_model, resolve_model_config
from fedprune_core.speech.text import CharVocabulary
from fedprune_core.speech.transducer import joint_lattices, lattice_log_probs, lattice_nll, padded_lattice_nll
from fedprune_core.speech.utterance import Utterance
from fedprune_core.submodel import dense_linear
from fedprune_core.training import ClientResult, LocalTrainingConfig, train_local

_JOINT_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.Tanh: "tanh"}
"""The joint activations whose lattices the loss computes from the joint's inputs (`joint_lattices`)."""


@dataclass(frozen=True)
class SpeechBatch:
    """A padded batch.

    Attributes:
        features: ``(B, T, n_mels)`` log-mel features, zero beyond each length.
        feature_lengths: ``(B,)`` int32 valid frames.
        targets: ``(B, U)`` int32 symbol indices, padded with blank.
        target_lengths: ``(B,)`` int32 valid symbols.
        texts: The ``B`` transcripts.
    """

    features: torch.Tensor
    feature_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    texts: tuple[str, ...]

    def to(self, device: torch.device) -> SpeechBatch:
        """The same batch with its tensors on ``device``."""
        move = functools.partial(torch.Tensor.to, device=device)
        return SpeechBatch(
            move(self.features),
            move(self.feature_lengths),
            move(self.targets),
            move(self.target_lengths),
            self.texts,
        )


def pad_audio(utterances: Sequence[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack waveforms into ``(B, N_max)`` with zero padding, and their ``(B,)`` lengths."""
    lengths = torch.tensor([u.audio.numel() for u in utterances])
    return nn.utils.rnn.pad_sequence([u.audio for u in utterances], batch_first=True), lengths


@dataclass(frozen=True)
class SpeechWorkload:
    """Conformer-Transducer speech recognition with a character vocabulary.

    Attributes:
        model: A preset name of :data:`~fedprune_core.speech.model.MODEL_PRESETS` or a config.
        vocabulary: Output characters; its size must match the model's ``num_symbols``.
        features: Log-mel settings; ``n_mels`` must match the model's.
        spec_augment: Masking applied to training batches, or ``None`` for none.
        max_symbols_per_frame: Greedy-decoding cap on symbols per encoder frame.
    """

    model: str | ModelConfig = "tiny"
    vocabulary: CharVocabulary = field(default_factory=CharVocabulary)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentConfig | None = field(default_factory=SpecAugmentConfig)
    max_symbols_per_frame: int = 5

    def __post_init__(self) -> None:
        config = self.model_config
        if config.num_symbols != self.vocabulary.size:
            raise ValueError(
                f"model num_symbols={config.num_symbols} must equal vocabulary size {self.vocabulary.size} "
                "(characters + blank): build the ModelConfig with num_symbols=vocabulary.size"
            )
        if config.n_mels != self.features.n_mels:
            raise ValueError(f"model n_mels={config.n_mels} must equal features n_mels={self.features.n_mels}")

    @property
    def model_config(self) -> ModelConfig:
        """The resolved model configuration."""
        return resolve_model_config(self.model)

    def build_model(self, seed: int = 0) -> ConformerTransducer:
        """A fresh model, initialised from ``seed``."""
        return build_model(self.model_config, seed)

    def collate(self, utterances: list[Utterance], generator: torch.Generator | None = None) -> SpeechBatch:
        """Features and targets of ``utterances``; SpecAugment is applied when ``generator`` is given.

        Raises:
            ValueError: A transcript has characters outside the vocabulary (the error names the utterance).
        """
        audio, lengths = pad_audio(utterances)
        feats, frames = log_mel(audio, lengths, self.features)
        if generator is not None and self.spec_augment is not None:
            feats = spec_augment(feats, frames, self.spec_augment, generator)
        targets = [self.vocabulary.encode(u.text, where=f"utterance {u.utterance_id}") for u in utterances]
        target_lengths = torch.tensor([t.numel() for t in targets], dtype=torch.int32)
        padded = nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=self.vocabulary.blank)
        return SpeechBatch(feats, frames, padded, target_lengths, tuple(u.text for u in utterances))

    def loss_fn(self, model: nn.Module, batch: SpeechBatch) -> torch.Tensor:
        """Transducer loss in nats per target character.

        Args:
            model: A :class:`~fedprune_core.speech.model.ConformerTransducer` (or a submodel of one).
            batch: From :meth:`collate`.
        """
        transducer = cast(RNNT, model)
        b = batch.to(next(model.parameters()).device)
        blank_first = nn.functional.pad(b.targets, (1, 0), value=self.vocabulary.blank)  # (B, U + 1)
        encodings, frames = transducer.transcribe(b.features, b.feature_lengths)  # (B, T', D)
        predictions, _, _ = transducer.predict(blank_first, b.target_lengths + 1, None)  # (B, U + 1, D)
        # The joint tensor is (T', U + 1, D) per utterance; joining each one at its own size
        # instead of the padded (B, T'max, Umax + 1, D) halves the cost of the joint and the loss.
        lengths = list(zip(frames.tolist(), b.target_lengths.tolist(), strict=True))
        joiner = transducer.joiner
        dense = dense_linear(joiner.linear)
        activation = _JOINT_ACTIVATIONS.get(type(joiner.activation))
        if dense is not None and activation is not None and torch.is_grad_enabled():
            # Neither the joint's (T', U + 1, D) activations nor its (T', U + 1, V) output are kept
            # for backward: both are computed again in the backward pass from the joint's two inputs
            # (the largest tensors of a training step otherwise: a fifth of a `small` client's
            # training memory).
            source, joint_prediction = joiner.inputs(encodings, predictions)
            lattices = joint_lattices(source, joint_prediction, lengths, b.targets, activation, *dense,
                                      self.vocabulary.blank)
            nll = padded_lattice_nll(lattices, frames, b.target_lengths)
        else:
            nll = lattice_nll([
                lattice_log_probs(joiner.linear(joiner.hidden(encodings[i, :t], predictions[i, : u + 1])),
                                  b.targets[i, :u], self.vocabulary.blank)
                for i, (t, u) in enumerate(lengths)
            ])
        return nll.sum() / b.target_lengths.sum()

    def train_client(
        self,
        model: nn.Module,
        utterances: Sequence[Utterance],
        config: LocalTrainingConfig,
        generator: torch.Generator,
        after_step: Callable[[], None] | None = None,
    ) -> ClientResult:
        """K local steps on one client's utterances; batches and SpecAugment masks come from ``generator``."""
        collate = functools.partial(self.collate, generator=generator)
        return train_local(model, utterances, self.loss_fn, collate, config, generator, after_step)

    def _batches(self, utterances: Sequence[Utterance], batch_size: int) -> list[list[int]]:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        if not utterances:
            raise ValueError("utterances is empty: evaluation needs at least one utterance")
        order = sorted(range(len(utterances)), key=lambda i: utterances[i].audio.numel())  # less padding
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def _decode(self, model: nn.Module, batch: SpeechBatch, beam_width: int | None) -> list[str]:
        blank = self.vocabulary.blank
        if beam_width is None:
            tokens = greedy_decode(model, batch.features, batch.feature_lengths, blank, self.max_symbols_per_frame)
        else:
            tokens = beam_decode(model, batch.features, batch.feature_lengths, blank, beam_width)
        return [self.vocabulary.decode(t) for t in tokens]

    @torch.no_grad()
    def _run(
        self, model: nn.Module, utterances: Sequence[Utterance], batch_size: int, beam_width: int | None
    ) -> tuple[list[str], float]:
        """Hypotheses in input order and the loss in nats per character, in one pass in eval mode."""
        hypotheses = [""] * len(utterances)
        total, chars = 0.0, 0
        was_training = model.training
        model.eval()
        for indices in self._batches(utterances, batch_size):
            batch = self.collate([utterances[i] for i in indices]).to(next(model.parameters()).device)
            n = int(batch.target_lengths.sum())
            total, chars = total + float(self.loss_fn(model, batch)) * n, chars + n
            for i, hypothesis in zip(indices, self._decode(model, batch, beam_width), strict=True):
                hypotheses[i] = hypothesis
        model.train(was_training)
        return hypotheses, total / chars

    def transcribe(
        self,
        model: nn.Module,
        utterances: Sequence[Utterance],
        batch_size: int = 16,
        beam_width: int | None = None,
    ) -> list[str]:
        """Decode ``utterances`` greedily, or by beam search when ``beam_width`` is given.

        Returns:
            One hypothesis per utterance, in input order.
        """
        return self._run(model, utterances, batch_size, beam_width)[0]

    def evaluate(
        self,
        model: nn.Module,
        utterances: Sequence[Utterance],
        batch_size: int = 16,
        beam_width: int | None = None,
    ) -> dict[str, float]:
        """Corpus WER and CER of the decoded hypotheses, and the loss (nats per character).

        Returns:
            ``{"wer": ..., "cer": ..., "loss": ...}``.
        """
        hypotheses, loss = self._run(model, utterances, batch_size, beam_width)
        references = [u.text for u in utterances]
        return {
            "wer": word_error_rate(references, hypotheses),
            "cer": char_error_rate(references, hypotheses),
            "loss": loss,
        }

"""The in-memory unit of speech data that the speech workload consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Utterance:
    """One spoken sentence.

    Attributes:
        utterance_id: Unique id, e.g. ``"spk003-00012"`` or LibriSpeech's ``"84-121123-0001"``.
        speaker_id: Who spoke it; in federated runs one speaker is one client.
        text: Transcript in the workload's character vocabulary.
        audio: ``(N,)`` float32 waveform at 16 kHz.
    """

    utterance_id: str
    speaker_id: str
    text: str
    audio: torch.Tensor

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds at 16 kHz."""
        return self.audio.numel() / 16_000

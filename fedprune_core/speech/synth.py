"""Speech synthesis with eSpeak NG through ctypes, plus background noise at a chosen level.

Stands in for the LibriSpeech speakers of Federated Pruning (Lin et al., Interspeech 2022):
each synthetic speaker is an eSpeak NG accent x voice variant x pitch x rate, with its own
noise colour, signal-to-noise ratio and loudness.

Determinism: eSpeak NG keeps state in C statics that survive ``espeak_Terminate`` (e.g. the
pitch-flutter index in ``AdvanceParameters``), so the same text gives slightly different samples
depending on what the process synthesised before. Each call therefore loads the library, speaks
and unloads it again (``dlclose``), checking that the unload really happened, and resets libc's
``rand()`` seed; a fresh load starts from zero state (about 6 ms per call). Voices with a
``breath`` setting stay non-reproducible even so, and the corpus does not use them (see
``corpus.VARIANTS``). A process-wide lock serialises calls: the C library is not re-entrant.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torchaudio.functional as AF

SAMPLE_RATE: int = 16_000
NOISE_KINDS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # spectral slope: power ~ 1/f^x

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PHONEMES_IPA = 2
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LOCK = threading.Lock()
_dlclose = _ctypes.dlclose  # type: ignore[attr-defined]
_LIBC = ctypes.CDLL(None)


@dataclass(frozen=True)
class Voice:
    """How eSpeak NG speaks.

    Attributes:
        accent: eSpeak NG English language name, e.g. ``"en-us"``, ``"en-gb-scotland"``.
        variant: Voice variant from ``espeak-ng-data/voices/!v``, e.g. ``"m3"``; ``""`` for none.
        pitch: Base pitch in eSpeak units, [0, 100] (50 is the voice's default).
        rate: Speaking rate in words per minute, [80, 450].
    """

    accent: str
    variant: str
    pitch: int
    rate: int

    def __post_init__(self) -> None:
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"pitch={self.pitch} must be in [0, 100]: eSpeak's default is 50")
        if not 80 <= self.rate <= 450:
            raise ValueError(f"rate={self.rate} must be in [80, 450] words per minute: try 175")

    @property
    def espeak_name(self) -> str:
        """The name passed to ``espeak_SetVoiceByName``, e.g. ``"en-us+m3"``."""
        return f"{self.accent}+{self.variant}" if self.variant else self.accent


@dataclass(frozen=True)
class Noise:
    """A speaker's recording conditions.

    Attributes:
        kind: Noise colour, a key of :data:`NOISE_KINDS`.
        snr_db: Speech-to-noise power ratio in dB.
        level_dbfs: RMS level of the mixed signal in dB relative to full scale (< 0).
    """

    kind: str
    snr_db: float
    level_dbfs: float

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind={self.kind!r} must be one of {sorted(NOISE_KINDS)}")
        if not self.level_dbfs < 0:
            raise ValueError(f"level_dbfs={self.level_dbfs} must be < 0 dBFS: try -24")


def _library_path() -> tuple[str, str]:
    import espeakng_loader

    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _is_loaded(path: str) -> bool:
    try:
        probe = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    _dlclose(probe._handle)  # undo the probe's reference
    return True


def _speak(lib: ctypes.CDLL, data_path: str, text: str, voice: Voice) -> tuple[list[torch.Tensor], int]:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data at {data_path}")
    chunks: list[torch.Tensor] = []

    def on_audio(wav: ctypes._Pointer, count: int, _events: int) -> int:  # type: ignore[type-arg]
        if count > 0 and wav:
            chunks.append(torch.frombuffer(bytearray(ctypes.string_at(wav, 2 * count)), dtype=torch.int16))
        return 0

    callback = _SYNTH_CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(callback)
    _LIBC.srand(0)  # in case a voice draws noise from libc's rand()
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    if lib.espeak_SetVoiceByName(voice.espeak_name.encode()) != 0:
        raise ValueError(f"voice {voice.espeak_name!r} is not an eSpeak NG voice: see espeak-ng-data/voices")
    lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
    lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
    encoded = text.encode()
    uint, ptr = ctypes.c_uint, ctypes.c_void_p
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, uint, uint, uint, uint, ptr, ptr]
    lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
    lib.espeak_Synchronize()
    lib.espeak_Terminate()
    return chunks, rate


@contextlib.contextmanager
def _fresh_library() -> Iterator[tuple[ctypes.CDLL, str]]:
    """Load libespeak-ng for one use and unload it after, so no state survives (see module docstring)."""
    lib_path, data_path = _library_path()
    with _LOCK:
        lib = ctypes.CDLL(lib_path)
        try:
            yield lib, data_path
        finally:
            _dlclose(lib._handle)
        if _is_loaded(lib_path):
            raise RuntimeError(
                f"{lib_path} stayed loaded after dlclose, so its state would leak between utterances: "
                "do not load libespeak-ng elsewhere in this process"
            )


def synthesize(text: str, voice: Voice) -> torch.Tensor:
    """Speak ``text`` with eSpeak NG, resampled to :data:`SAMPLE_RATE`.

    Args:
        text: What to say (plain UTF-8 text, no SSML).
        voice: How to say it.

    Returns:
        ``(N,)`` float32 waveform in [-1, 1] at 16 kHz.

    Raises:
        ValueError: The voice is unknown or the text produced no audio.
        RuntimeError: The library could not be initialised or unloaded.
    """
    with _fresh_library() as (lib, data_path):
        chunks, native_rate = _speak(lib, data_path, text, voice)
    if not chunks:
        raise ValueError(f"eSpeak NG produced no audio for text {text!r}: pass words to speak")
    audio = torch.cat(chunks).float() / 32768.0
    return AF.resample(audio, native_rate, SAMPLE_RATE) if native_rate != SAMPLE_RATE else audio


def phonemes(text: str, accent: str = "en-us") -> str:
    """eSpeak NG's IPA phonemes for ``text`` in ``accent``, stress marks removed.

    Used to check that no two corpus words sound the same.
    """
    with _fresh_library() as (lib, data_path):
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        if lib.espeak_SetVoiceByName(accent.encode()) != 0:
            raise ValueError(f"accent {accent!r} is not an eSpeak NG voice: e.g. 'en-us'")
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        pointer = ctypes.c_char_p(text.encode())
        parts = []
        while pointer.value:  # the call consumes one clause and advances the pointer
            parts.append(lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA).decode())
        lib.espeak_Terminate()
    return " ".join(parts).replace("ˈ", "").replace("ˌ", "")


def colored_noise(num_samples: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with power spectrum ~ 1/f^x (x from :data:`NOISE_KINDS`), unit RMS.

    Coloured noise is shaped in the frequency domain at the next power-of-two length (fast FFT
    sizes) and cropped.

    Returns:
        ``(num_samples,)`` float32 noise.
    """
    slope = NOISE_KINDS[kind]
    size = 1 << max(num_samples - 1, 1).bit_length() if slope else num_samples
    noise = torch.randn(size, generator=generator)
    if slope:
        spectrum = torch.fft.rfft(noise)
        freqs = torch.arange(spectrum.numel(), dtype=torch.float32).clamp(min=1.0)
        noise = torch.fft.irfft(spectrum * freqs.pow(-slope / 2), n=size)[:num_samples]
    return noise / noise.pow(2).mean().sqrt().clamp(min=1e-12)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt().clamp(min=1e-12)


def mix_noise(audio: torch.Tensor, noise: Noise, generator: torch.Generator) -> torch.Tensor:
    """Add coloured noise at ``noise.snr_db`` and scale the mix to ``noise.level_dbfs``.

    Args:
        audio: ``(N,)`` clean waveform.
        noise: Recording conditions.
        generator: Source of the noise samples.

    Returns:
        ``(N,)`` float32 waveform, clipped to [-1, 1].
    """
    background = colored_noise(audio.numel(), noise.kind, generator)
    mixed = audio + background * _rms(audio) * 10 ** (-noise.snr_db / 20)
    target_rms = 10 ** (noise.level_dbfs / 20)
    return (mixed * (target_rms / _rms(mixed))).clamp(-1.0, 1.0)

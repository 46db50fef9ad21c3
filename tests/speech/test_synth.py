import pytest
import torch

from fedprune_core.speech.synth import SAMPLE_RATE, Noise, Voice, colored_noise, mix_noise, synthesize

VOICE = Voice("en-us", "m3", 50, 175)


def test_synthesis_is_a_function_of_its_arguments():
    first = synthesize("green river", VOICE)
    synthesize("something else entirely", Voice("en-gb-scotland", "f2", 70, 150))  # leaves no state behind
    again = synthesize("green river", VOICE)
    assert first.dtype == torch.float32
    assert torch.equal(first, again)


def test_output_is_16_khz_speech_of_plausible_length():
    audio = synthesize("one two three four five", VOICE)
    seconds = audio.numel() / SAMPLE_RATE
    assert 1.0 < seconds < 4.0
    assert audio.abs().max() <= 1.0
    assert audio.pow(2).mean() > 1e-4


def test_faster_rate_gives_shorter_audio():
    slow = synthesize("the weather is sunny today", Voice("en-us", "", 50, 120))
    fast = synthesize("the weather is sunny today", Voice("en-us", "", 50, 240))
    assert fast.numel() < 0.75 * slow.numel()


def test_unknown_voice_is_an_error():
    with pytest.raises(ValueError, match="not an eSpeak NG voice"):
        synthesize("hello", Voice("xx-nowhere", "", 50, 175))


@pytest.mark.parametrize(("field", "value", "rule"), [("pitch", 101, r"\[0, 100\]"), ("rate", 20, r"\[80, 450\]")])
def test_voice_validation(field, value, rule):
    kwargs = {"accent": "en-us", "variant": "", "pitch": 50, "rate": 175, field: value}
    with pytest.raises(ValueError, match=rule):
        Voice(**kwargs)


def test_noise_validation():
    with pytest.raises(ValueError, match="must be one of"):
        Noise("purple", 20.0, -20.0)
    with pytest.raises(ValueError, match="< 0 dBFS"):
        Noise("white", 20.0, 3.0)


@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
def test_colored_noise_is_unit_rms_and_seeded(kind):
    a = colored_noise(5000, kind, torch.Generator().manual_seed(1))
    b = colored_noise(5000, kind, torch.Generator().manual_seed(1))
    assert a.shape == (5000,)
    assert torch.equal(a, b)
    assert a.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_redder_noise_has_more_low_frequency_power():
    def low_share(kind: str) -> float:
        power = torch.fft.rfft(colored_noise(16000, kind, torch.Generator().manual_seed(0))).abs().pow(2)
        return float(power[:400].sum() / power.sum())

    assert low_share("white") < low_share("pink") < low_share("brown")


def test_mix_noise_hits_the_snr_and_level():
    t = torch.arange(16000) / SAMPLE_RATE
    clean = 0.3 * torch.sin(2 * torch.pi * 440 * t)
    noise = Noise("white", snr_db=20.0, level_dbfs=-26.0)
    mixed = mix_noise(clean, noise, torch.Generator().manual_seed(0))
    rms_db = 20 * torch.log10(mixed.pow(2).mean().sqrt())
    assert rms_db.item() == pytest.approx(-26.0, abs=1e-3)
    scale = mixed.pow(2).mean().sqrt() / (clean.pow(2).mean() * (1 + 10 ** (-20 / 10))).sqrt()
    residual = mixed - clean * scale  # the noise part, up to the independent-noise approximation
    snr = 10 * torch.log10((clean * scale).pow(2).mean() / residual.pow(2).mean())
    assert snr.item() == pytest.approx(20.0, abs=0.5)


_SPEAK_ALL_VARIANTS = """
import hashlib, json, sys
from fedprune_core.speech.corpus import ACCENTS, VARIANTS
from fedprune_core.speech.synth import Voice, synthesize
warm = int(sys.argv[1])
for k in range(warm):  # different history before the measured calls
    voice = Voice(ACCENTS[k % len(ACCENTS)], VARIANTS[(7 * k) % len(VARIANTS)], 40 + k, 150)
    synthesize(f"warm up number {k}", voice)
order = VARIANTS if warm % 2 == 0 else VARIANTS[::-1]
text = "the quick brown fox jumps over the lazy dog"
audio = {v: synthesize(text, Voice("en-gb-x-gbclan", v, 39, 156)) for v in order}
print(json.dumps({v: hashlib.sha256(a.numpy().tobytes()).hexdigest() for v, a in audio.items()}))
"""


def test_every_corpus_voice_sounds_the_same_in_another_process():
    """Voices whose output depends on process history (eSpeak's breathy ones) must stay out of VARIANTS."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _SPEAK_ALL_VARIANTS, str(warm)],
                cwd=root,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for warm in (0, 3)
    ]
    assert runs[0] == runs[1]

import pytest
import torch
import torchaudio

from fedprune_core.speech.features import (
    FeatureConfig,
    SpecAugmentConfig,
    _mel_power,
    log_mel,
    num_frames,
    spec_augment,
)

CONFIG = FeatureConfig()


def _audio(n: int, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_frame_counts():
    audio = torch.stack([_audio(16000, 0), torch.cat([_audio(8000, 1), torch.zeros(8000)])])
    feats, frames = log_mel(audio, torch.tensor([16000, 8000]), CONFIG)
    assert feats.shape == (2, 101, 80)
    assert frames.tolist() == [101, 51] == num_frames(torch.tensor([16000, 8000]), CONFIG).tolist()
    assert frames.dtype == torch.int32


def test_mel_power_is_torchaudios_mel_spectrogram():
    config = FeatureConfig()
    audio = 0.1 * torch.randn(3, 16_000, generator=torch.Generator().manual_seed(0))
    expected = torchaudio.transforms.MelSpectrogram(
        sample_rate=16_000, n_fft=config.n_fft, win_length=config.win_length, hop_length=config.hop_length,
        n_mels=config.n_mels, pad_mode="constant",
    )(audio)
    torch.testing.assert_close(_mel_power(audio, config), expected, rtol=1e-5, atol=1e-7)


def test_valid_frames_are_normalised_and_padding_is_zero():
    audio = torch.cat([_audio(8000, 1), torch.zeros(8000)]).unsqueeze(0)
    feats, frames = log_mel(audio, torch.tensor([8000]), CONFIG)
    valid = feats[0, :51]
    assert valid.mean(0).abs().max() < 1e-4
    assert valid.std(0, unbiased=False).sub(1).abs().max() < 1e-2
    assert feats[0, 51:].abs().max() == 0


def test_features_do_not_depend_on_batch_padding():
    alone, _ = log_mel(_audio(8000, 3).unsqueeze(0), torch.tensor([8000]), CONFIG)
    padded_audio = torch.stack([_audio(16000, 4), torch.cat([_audio(8000, 3), torch.zeros(8000)])])
    batch, _ = log_mel(padded_audio, torch.tensor([16000, 8000]), CONFIG)
    # The centred STFT pads with zeros, which is what the batch holds after the utterance.
    torch.testing.assert_close(batch[1, :51], alone[0], atol=1e-4, rtol=1e-4)


def test_spec_augment_is_seeded_and_only_zeroes():
    feats = torch.randn(3, 200, 80) + 5.0  # no natural zeros
    lengths = torch.tensor([200, 150, 100])
    config = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=2, time_width_ratio=0.05)
    a = spec_augment(feats, lengths, config, torch.Generator().manual_seed(0))
    b = spec_augment(feats, lengths, config, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    changed = a != feats
    assert (a[changed] == 0).all()
    # at most 2 bands of 10 bins and 2 spans of 5% of the frames
    per_frame_zero = (a == 0).all(dim=2).sum(1)
    assert (per_frame_zero <= 2 * (lengths * 0.05).floor()).all()
    per_bin_zero = (a[:, :100] == 0).all(dim=1).sum(1)
    assert (per_bin_zero <= 20).all()


def test_spec_augment_off_is_identity():
    feats = torch.randn(2, 50, 80)
    none = SpecAugmentConfig(freq_masks=0, time_masks=0)
    assert torch.equal(spec_augment(feats, torch.tensor([50, 40]), none, torch.Generator()), feats)


def test_config_validation():
    with pytest.raises(ValueError, match="win_length"):
        FeatureConfig(win_length=1024, n_fft=512)
    with pytest.raises(ValueError, match="time_width_ratio"):
        SpecAugmentConfig(time_width_ratio=1.0)

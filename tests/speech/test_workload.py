import dataclasses

import pytest
import torch

from fedprune_core.speech.features import SpecAugmentConfig
from fedprune_core.speech.synth import Voice, synthesize
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.training import ClientResult, LocalTrainingConfig

VOICE = Voice("en-us", "m3", 50, 175)
TEXTS = ["red apple", "blue river", "seven", "quiet forest"]


@pytest.fixture(scope="module")
def utterances() -> list[Utterance]:
    return [Utterance(f"u{i}", "spk", t, synthesize(t, VOICE)) for i, t in enumerate(TEXTS)]


def test_collate_shapes_and_padding(utterances):
    w = SpeechWorkload()
    batch = w.collate(utterances)
    assert batch.features.shape[0] == 4 and batch.features.shape[2] == 80
    assert batch.targets.shape == (4, max(len(t) for t in TEXTS))
    assert batch.target_lengths.tolist() == [len(t) for t in TEXTS]
    assert batch.targets[2, len("seven") :].eq(w.vocabulary.blank).all()
    assert batch.texts == tuple(TEXTS)


def test_collate_names_the_utterance_with_bad_text(utterances):
    bad = dataclasses.replace(utterances[0], utterance_id="spk-007", text="Red apple!")
    with pytest.raises(ValueError, match=r"utterance spk-007: text 'Red apple!' has characters \['R', '!'\]"):
        SpeechWorkload().collate([bad])


def test_spec_augment_only_with_a_generator(utterances):
    w = SpeechWorkload()
    plain = w.collate(utterances).features
    assert torch.equal(plain, w.collate(utterances).features)
    masked = w.collate(utterances, torch.Generator().manual_seed(0)).features
    assert not torch.equal(plain, masked)
    off = SpeechWorkload(spec_augment=None).collate(utterances, torch.Generator().manual_seed(0)).features
    assert torch.equal(plain, off)


def test_loss_matches_the_padded_rnnt_loss(utterances):
    import torchaudio.functional as AF

    w = SpeechWorkload()
    model = w.build_model()
    batch = w.collate(utterances)
    targets = torch.nn.functional.pad(batch.targets, (1, 0), value=w.vocabulary.blank)
    logits, frames, _, _ = model(batch.features, batch.feature_lengths, targets, batch.target_lengths + 1)
    padded = (
        AF.rnnt_loss(
            logits,
            batch.targets,
            frames.int(),
            batch.target_lengths,
            blank=w.vocabulary.blank,
            reduction="sum",
        )
        / batch.target_lengths.sum()
    )
    torch.testing.assert_close(w.loss_fn(model, batch), padded, rtol=1e-5, atol=1e-5)


def test_train_client_is_reproducible_and_reports(utterances):
    w = SpeechWorkload()
    config = LocalTrainingConfig(steps=2, batch_size=2, lr=1e-3, optimizer="adam")
    results = [w.train_client(w.build_model(), utterances, config, torch.Generator().manual_seed(5)) for _ in range(2)]
    a, b = results
    assert isinstance(a, ClientResult) and a.num_examples == 4 and a.grad_sq is None
    assert a.mean_loss == b.mean_loss
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.wall_time_s > 0 and a.peak_memory_bytes > 4 * sum(p.numel() for p in a.state.values())


def test_overfitting_a_handful_of_utterances_then_decoding_them_exactly(utterances):
    """The loss falls and greedy and beam decoding reproduce the training transcripts."""
    w = SpeechWorkload(model="tiny", spec_augment=None)
    model = w.build_model(seed=0)
    before = w.evaluate(model, utterances)
    config = LocalTrainingConfig(steps=150, batch_size=4, lr=5e-3, optimizer="adam", max_grad_norm=5.0)
    result = w.train_client(model, utterances, config, torch.Generator().manual_seed(0))
    after = w.evaluate(model, utterances)
    assert after["loss"] < 0.1 * before["loss"]
    assert result.mean_loss < before["loss"]
    assert w.transcribe(model, utterances) == TEXTS
    assert after["wer"] == 0.0 and after["cer"] == 0.0
    assert w.transcribe(model, utterances[:2], beam_width=3) == TEXTS[:2]


def test_mismatched_vocabulary_and_model_are_rejected():
    from fedprune_core.speech.model import MODEL_PRESETS
    from fedprune_core.speech.text import CharVocabulary

    with pytest.raises(ValueError, match="num_symbols=29 must equal vocabulary size 4"):
        SpeechWorkload(model=MODEL_PRESETS["tiny"], vocabulary=CharVocabulary("abc"))


def test_evaluate_rejects_no_utterances():
    w = SpeechWorkload()
    with pytest.raises(ValueError, match="at least one utterance"):
        w.evaluate(w.build_model(), [])


def test_spec_augment_config_is_part_of_the_workload():
    assert SpeechWorkload().spec_augment == SpecAugmentConfig()

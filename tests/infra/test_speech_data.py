import json
import logging
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fedprune_core.speech.corpus import CORPUS_PRESETS, plan_corpus, render_utterance
from infra.speech_data import (
    MANIFEST,
    SpeechDataError,
    corpus_dir,
    generate_corpus,
    load_split,
    read_index,
    read_librispeech,
    read_manifest,
    read_wav,
    write_wav,
)

CONFIG = CORPUS_PRESETS["test"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(CONFIG, tmp_path_factory.mktemp("cache"), progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(corpus, tmp_path):
    again = generate_corpus(CONFIG, tmp_path, progress=False)
    assert again.name == corpus.name
    assert _files(again) == _files(corpus)


def test_cache_is_reused_not_rewritten(corpus):
    index = corpus / "index.json"
    stamp = index.stat().st_mtime_ns
    assert generate_corpus(CONFIG, corpus.parent, progress=False) == corpus
    assert index.stat().st_mtime_ns == stamp
    assert not [p for p in corpus.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_a_corpus_missing_its_index_is_rendered_again_byte_for_byte(corpus, tmp_path, caplog):
    damaged = tmp_path / corpus.name
    shutil.copytree(corpus, damaged)
    (damaged / "index.json").unlink()
    shutil.rmtree(damaged / "train" / "spk000")  # what else is wrong is unknown: nothing of it is trusted
    next(damaged.rglob("*.wav")).write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="infra.speech_data"):
        healed = generate_corpus(CONFIG, tmp_path, progress=False)
    assert healed == damaged
    assert _files(healed) == _files(corpus)
    assert f"corpus {damaged} has no index.json" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [corpus.name]  # nothing moved aside or staged is left


def test_a_part_of_the_corpus_holds_the_same_bytes_as_those_clients_of_the_whole(corpus, tmp_path):
    speakers = [p.speaker.speaker_id for p in plan_corpus(CONFIG).train]
    part = generate_corpus(CONFIG, tmp_path, progress=False, clients=[3, 1], held_out=False)
    assert part.name == corpus.name
    whole = _files(corpus)
    own = ("train/" + speakers[1] + "/", "train/" + speakers[3] + "/")
    assert _files(part) == {k: v for k, v in whole.items() if k.startswith(own) or k == "index.json"}
    # Adding clients and the held-out speakers later renders only what is missing, into the same bytes.
    stamp = (part / "train" / speakers[1] / MANIFEST).stat().st_mtime_ns
    assert generate_corpus(CONFIG, tmp_path, progress=False) == part
    assert _files(part) == whole
    assert (part / "train" / speakers[1] / MANIFEST).stat().st_mtime_ns == stamp
    assert not [p for p in part.iterdir() if p.name.startswith(".")]  # no staging left over


def test_a_client_outside_the_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"clients \[4\] are not clients of the corpus: its clients are 0-3"):
        generate_corpus(CONFIG, tmp_path, progress=False, clients=[0, 4])


def test_layout_index_and_round_trip(corpus):
    index = read_index(corpus)
    plan = plan_corpus(CONFIG)
    assert index["sample_rate"] == 16000
    for split, plans in plan.splits.items():
        assert index["splits"][split] == {p.speaker.speaker_id: len(p.utterances) for p in plans}
    train = load_split(corpus, "train")
    first = plan.train[0]
    rendered = render_utterance(first.utterances[0], first.speaker)
    loaded = train[first.speaker.speaker_id][0]
    assert (loaded.utterance_id, loaded.text, loaded.speaker_id) == (
        rendered.utterance_id,
        rendered.text,
        rendered.speaker_id,
    )
    torch.testing.assert_close(loaded.audio, rendered.audio, atol=2 / 32767, rtol=0)  # 16-bit quantisation
    with wave.open(str(corpus / "train" / first.speaker.speaker_id / f"{loaded.utterance_id}.wav")) as f:
        assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (16000, 2, 1)


def test_other_configs_get_other_directories(tmp_path):
    other = CORPUS_PRESETS["test"].__class__(**{**CONFIG.__dict__, "seed": 9})
    assert corpus_dir(other, tmp_path) != corpus_dir(CONFIG, tmp_path)


def _client_copy(corpus: Path, tmp_path: Path) -> Path:
    source = corpus / "train" / "spk000"
    target = tmp_path / "spk000"
    target.mkdir()
    for p in source.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target / MANIFEST


def _edit_line(manifest: Path, number: int, edit) -> None:
    lines = manifest.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    manifest.write_text("\n".join(lines) + "\n")


def test_missing_audio_names_manifest_line(corpus, tmp_path):
    manifest = _client_copy(corpus, tmp_path)
    name = json.loads(manifest.read_text().splitlines()[1])["audio"]
    (manifest.parent / name).unlink()
    with pytest.raises(SpeechDataError, match=rf"{MANIFEST}:2: audio file .*{name} does not exist"):
        read_manifest(manifest)


def test_corrupt_audio_names_the_file(corpus, tmp_path):
    manifest = _client_copy(corpus, tmp_path)
    name = json.loads(manifest.read_text().splitlines()[0])["audio"]
    (manifest.parent / name).write_bytes(b"not a wav file at all")
    with pytest.raises(SpeechDataError, match=rf"{MANIFEST}:1: audio file .*{name} is not a readable WAV"):
        read_manifest(manifest)


def test_truncated_audio_is_caught(corpus, tmp_path):
    manifest = _client_copy(corpus, tmp_path)
    path = manifest.parent / json.loads(manifest.read_text().splitlines()[0])["audio"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SpeechDataError, match="truncated"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda line: line[:-3], r":3: not valid JSON"),
        (lambda line: "[1, 2]", r":3: expected a JSON object"),
        (
            lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "text"}),
            r":3: fields \['text'\]",
        ),
        (
            lambda line: json.dumps({**json.loads(line), "text": "Cafe 42"}),
            r":3: text 'Cafe 42' has characters",
        ),
        (lambda line: json.dumps({**json.loads(line), "num_samples": 5}), r":3: manifest says 5 samples"),
    ],
)
def test_bad_manifest_lines_name_file_and_line(corpus, tmp_path, edit, message):
    manifest = _client_copy(corpus, tmp_path)
    _edit_line(manifest, 3, edit)
    with pytest.raises(SpeechDataError, match=message):
        read_manifest(manifest)


def test_empty_client_is_an_error(tmp_path):
    (tmp_path / MANIFEST).write_text("\n")
    with pytest.raises(SpeechDataError, match="lists no utterances"):
        read_manifest(tmp_path / MANIFEST)


def test_other_sample_rates_are_resampled_and_counted(corpus, tmp_path, caplog):
    manifest = _client_copy(corpus, tmp_path)
    record = json.loads(manifest.read_text().splitlines()[0])
    audio, _ = read_wav(manifest.parent / record["audio"])
    write_wav(manifest.parent / record["audio"], audio[::2], sample_rate=8000)
    with caplog.at_level(logging.WARNING, logger="infra.speech_data"):
        utterances = read_manifest(manifest)
    assert abs(utterances[0].audio.numel() - audio.numel()) <= 2
    assert "resampled 1 of" in caplog.text and "16000 Hz" in caplog.text


def test_stereo_wav_is_rejected(tmp_path):
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(b"\0\0" * 200)
    with pytest.raises(SpeechDataError, match="2 channel"):
        read_wav(path)


def _librispeech_tree(root: Path, rates: dict[str, int]) -> None:
    """Two speakers, one chapter each, in the LibriSpeech layout; audio at the given rates."""
    rng = np.random.default_rng(0)
    lines = {
        "19-198": ["19-198-0000 HELLO WORLD", "19-198-0001 IT'S A FINE DAY"],
        "26-495": ["26-495-0000 GOOD MORNING"],
    }
    for chapter_key, chapter_lines in lines.items():
        speaker, chapter = chapter_key.split("-")
        folder = root / "dev-clean" / speaker / chapter
        folder.mkdir(parents=True)
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(chapter_lines) + "\n")
        for line in chapter_lines:
            utterance_id = line.split()[0]
            rate = rates.get(utterance_id, 16000)
            soundfile.write(
                folder / f"{utterance_id}.flac",
                (0.1 * rng.standard_normal(rate // 2)).astype("float32"),
                rate,
            )


def test_librispeech_reader_one_client_per_speaker(tmp_path, caplog):
    _librispeech_tree(tmp_path, {"26-495-0000": 8000})
    with caplog.at_level(logging.WARNING, logger="infra.speech_data"):
        clients = read_librispeech(tmp_path, "dev-clean")
    assert list(clients) == ["19", "26"]
    assert [u.text for u in clients["19"]] == ["hello world", "it's a fine day"]
    assert [u.utterance_id for u in clients["19"]] == ["19-198-0000", "19-198-0001"]
    assert clients["26"][0].speaker_id == "26"
    assert clients["19"][0].audio.numel() == 8000
    assert abs(clients["26"][0].audio.numel() - 8000) <= 1  # 0.5 s at 8 kHz, resampled
    assert "resampled 1 of 3" in caplog.text


def test_librispeech_reader_reads_only_the_chosen_clients(tmp_path):
    _librispeech_tree(tmp_path, {})
    (tmp_path / "dev-clean" / "19" / "198" / "19-198-0000.flac").write_bytes(b"garbage")  # never opened
    assert list(read_librispeech(tmp_path, "dev-clean", clients=[1])) == ["26"]
    with pytest.raises(ValueError, match=r"clients \[2\] are not clients"):
        read_librispeech(tmp_path, "dev-clean", clients=[2])


def test_librispeech_errors_name_transcript_and_line(tmp_path):
    _librispeech_tree(tmp_path, {})
    transcript = tmp_path / "dev-clean" / "19" / "198" / "19-198.trans.txt"
    transcript.write_text("19-198-0000 HELLO WORLD\n19-198-0001 NUMBER 42\n")
    with pytest.raises(SpeechDataError, match=r"19-198.trans.txt:2: text 'number 42' has characters \['4', '2'\]"):
        read_librispeech(tmp_path, "dev-clean")
    transcript.write_text("19-198-0000 HELLO WORLD\n19-198-0009 MISSING AUDIO\n")
    with pytest.raises(SpeechDataError, match=r"19-198.trans.txt:2: audio file .*19-198-0009.flac does not exist"):
        read_librispeech(tmp_path, "dev-clean")
    (tmp_path / "dev-clean" / "19" / "198" / "19-198-0000.flac").write_bytes(b"garbage")
    transcript.write_text("19-198-0000 HELLO WORLD\n")
    with pytest.raises(SpeechDataError, match=r"19-198.trans.txt:1: audio file .*19-198-0000.flac cannot be decoded"):
        read_librispeech(tmp_path, "dev-clean")
    with pytest.raises(SpeechDataError, match="is not a directory"):
        read_librispeech(tmp_path, "test-other")

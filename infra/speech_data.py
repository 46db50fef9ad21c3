"""Speech data on disk: the synthetic corpus cache and a LibriSpeech reader.

Cache layout, one directory per corpus configuration::

    <cache_dir>/synth-<sha256 of the corpus plan, 12 hex>/
      index.json                                   config, speakers, utterance counts (the whole corpus)
      <split>/<speaker_id>/manifest.jsonl          one JSON object per utterance (see `_manifest_line`)
      <split>/<speaker_id>/<utterance_id>.wav      16 kHz, 16-bit PCM, mono

``generate_corpus`` creates a corpus directory with its ``index.json`` in one rename, then renders
each speaker into a staging folder and renames it into place, so a speaker folder that exists is
complete; a second call reuses it. It may render part of a corpus (some training clients, with or
without the test splits): a cluster worker holds only its own clients, byte-identical to the same
clients of the whole corpus. A directory without ``index.json`` (the index lost, or files removed
by hand) is not trusted: it is moved aside and rendered again, byte-identical to a fresh cache.

Reading validates every line and file. Problems raise :class:`SpeechDataError` naming the file
(and ``manifest.jsonl:<line>`` for manifest entries): a missing or corrupt WAV/FLAC, a bad JSON
line, a missing field, a sample count that disagrees with the manifest, an empty client,
characters outside the vocabulary. One thing is repaired instead: audio at another sample rate
is resampled to 16 kHz with ``torchaudio.functional.resample``, and the count of resampled files
is logged at WARNING level.

LibriSpeech (Panayotov et al., ICASSP 2015) is read from its standard layout
``<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` plus ``<utterance>.flac``;
each speaker becomes one client, and the uppercase transcripts are lowercased.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchaudio.functional as AF

from fedprune_core.speech.corpus import (
    SPLITS,
    CorpusConfig,
    CorpusPlan,
    SpeakerPlan,
    plan_corpus,
    render_utterance,
)
from fedprune_core.speech.synth import SAMPLE_RATE
from fedprune_core.speech.text import CharVocabulary, normalize_transcript
from fedprune_core.speech.utterance import Utterance

LOG = logging.getLogger(__name__)
INDEX = "index.json"
MANIFEST = "manifest.jsonl"
FORMAT_VERSION = 1
ClientData = dict[str, list[Utterance]]
"""Speaker (= client) id -> that speaker's utterances."""


class SpeechDataError(ValueError):
    """Speech data on disk is missing, malformed, or not in the vocabulary."""


# --------------------------------------------------------------------------- audio files


def write_wav(path: Path, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``(N,)`` float audio in [-1, 1] as 16-bit PCM mono WAV."""
    pcm = (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().tobytes())


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Read a 16-bit PCM mono WAV as ``(N,)`` float32 in [-1, 1] and its sample rate.

    Raises:
        SpeechDataError: The file is missing, not a WAV, not 16-bit mono PCM, or truncated.
    """
    if not path.is_file():
        raise SpeechDataError(f"audio file {path} does not exist: regenerate the corpus or fix the manifest")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = (
                f.getnchannels(),
                f.getsampwidth(),
                f.getframerate(),
                f.getnframes(),
            )
            data = f.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise SpeechDataError(f"audio file {path} is not a readable WAV ({e}): regenerate or replace it") from e
    if channels != 1 or width != 2:
        raise SpeechDataError(
            f"audio file {path} has {channels} channel(s) of {8 * width}-bit samples; "
            "the reader takes 16-bit PCM mono: convert it, e.g. sox in.wav -b 16 -c 1 out.wav"
        )
    if len(data) != 2 * frames:
        raise SpeechDataError(
            f"audio file {path} is truncated: header says {frames} samples, "
            f"found {len(data) // 2}: regenerate or replace it"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.int16).float() / 32768.0, rate


def read_flac(path: Path) -> tuple[torch.Tensor, int]:
    """Read a FLAC (or any libsndfile format) as ``(N,)`` float32 mono and its sample rate."""
    import soundfile

    if not path.is_file():
        raise SpeechDataError(f"audio file {path} does not exist: check the transcript and the audio files")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise SpeechDataError(f"audio file {path} cannot be decoded ({e}): re-download or replace it") from e
    if data.shape[1] != 1:
        raise SpeechDataError(f"audio file {path} has {data.shape[1]} channels: the reader takes mono audio")
    return torch.from_numpy(data[:, 0].copy()), int(rate)


class ResampleCounter:
    """Brings audio to 16 kHz and counts how many files needed it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, audio: torch.Tensor, rate: int) -> torch.Tensor:
        if rate == SAMPLE_RATE:
            return audio
        self.count += 1
        return AF.resample(audio, rate, SAMPLE_RATE)

    def log(self, what: str, total: int) -> None:
        if self.count:
            LOG.warning("resampled %d of %d audio files of %s to %d Hz", self.count, total, what, SAMPLE_RATE)


def _validate_text(vocabulary: CharVocabulary, text: str, where: str) -> None:
    try:
        vocabulary.validate(text, where=where)
    except ValueError as e:
        raise SpeechDataError(str(e)) from e


# --------------------------------------------------------------------------- the synthetic corpus cache


def corpus_dir(config: CorpusConfig, cache_dir: Path, plan: CorpusPlan | None = None) -> Path:
    """Where the corpus of ``config`` lives under ``cache_dir``.

    The name hashes the whole plan (speakers, sentences, noise seeds) and the cache format
    version, so a change to the word list or voice table cannot reuse a stale cache.
    """
    plan = plan or plan_corpus(config)
    digest = hashlib.sha256(f"{FORMAT_VERSION}:{plan!r}".encode()).hexdigest()
    return Path(cache_dir) / f"synth-{digest[:12]}"


def _manifest_line(utterance: Utterance, audio_name: str) -> str:
    record = {
        "utterance_id": utterance.utterance_id,
        "speaker_id": utterance.speaker_id,
        "text": utterance.text,
        "audio": audio_name,
        "num_samples": utterance.audio.numel(),
    }
    return json.dumps(record) + "\n"


def _index(plan: CorpusPlan) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "sample_rate": SAMPLE_RATE,
        "config": dataclasses.asdict(plan.config),
        "splits": {
            split: {p.speaker.speaker_id: len(p.utterances) for p in plans} for split, plans in plan.splits.items()
        },
        "speakers": {
            p.speaker.speaker_id: dataclasses.asdict(p.speaker) for plans in plan.splits.values() for p in plans
        },
    }


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synthesising speech"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(file=sys.stderr), disable=not enabled)


def _speaker_plans(
    plan: CorpusPlan, clients: Sequence[int] | None, held_out: bool
) -> list[tuple[str, SpeakerPlan]]:
    """(split, speaker plan) of the training `clients` (None: all) and, if `held_out`, the test splits."""
    train = plan.train if clients is None else [plan.train[c] for c in _check_clients(clients, len(plan.train))]
    chosen = [("train", p) for p in train]
    if held_out:
        chosen += [(split, p) for split in SPLITS if split != "train" for p in plan.splits[split]]
    return chosen


def _check_clients(clients: Sequence[int], num_clients: int) -> list[int]:
    bad = [c for c in clients if not 0 <= c < num_clients]
    if bad:
        raise ValueError(f"clients {bad} are not clients of the corpus: its clients are 0-{num_clients - 1}")
    return sorted(set(clients))


def _write_speaker(speaker_plan: SpeakerPlan, folder: Path, advance: Any) -> None:
    folder.mkdir(parents=True)
    with open(folder / MANIFEST, "w") as manifest:
        for planned in speaker_plan.utterances:
            utterance = render_utterance(planned, speaker_plan.speaker)
            write_wav(folder / f"{utterance.utterance_id}.wav", utterance.audio)
            manifest.write(_manifest_line(utterance, f"{utterance.utterance_id}.wav"))
            advance()


def _write_speakers(chosen: list[tuple[str, SpeakerPlan]], root: Path, progress: bool) -> None:
    """Render each speaker into a staging folder and rename it into place: a speaker folder that
    exists is complete. A folder another process renamed first is kept."""
    staging = root / f".staging-{os.getpid()}"
    total = sum(len(p.utterances) for _, p in chosen)
    try:
        with _progress(progress) as bar:
            task = bar.add_task("corpus", total=total)
            for split, speaker_plan in chosen:
                folder = staging / split / speaker_plan.speaker.speaker_id
                _write_speaker(speaker_plan, folder, lambda: bar.advance(task))
                (root / split).mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(folder, root / split / speaker_plan.speaker.speaker_id)
                except OSError:
                    if not (root / split / speaker_plan.speaker.speaker_id / MANIFEST).is_file():
                        raise  # not a lost race with another writer
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    # Rendering is thousands of small tensor ops; intra-op threads only add synchronisation, and on
    # a busy 2-core machine they made synthesis 20x slower (measured). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generate_corpus(
    config: CorpusConfig,
    cache_dir: Path | str,
    progress: bool = True,
    clients: Sequence[int] | None = None,
    held_out: bool = True,
) -> Path:
    """Render the corpus of ``config`` (or part of it) into ``cache_dir``; what exists is reused.

    A part holds the same bytes as the same speakers of the whole corpus: every utterance is
    rendered from the whole corpus's plan, whatever else is rendered with it.

    Args:
        config: What to generate (e.g. ``CORPUS_PRESETS["bench"]``).
        cache_dir: Parent directory of all cached corpora.
        progress: Show a progress bar on stderr.
        clients: The training clients to render (None: all of them); e.g. a worker's own clients.
        held_out: Render the test splits too (the server's evaluation data; workers need none).

    Returns:
        The corpus directory (see the module docstring for its layout). Its ``index.json`` always
        describes the whole corpus; a speaker folder exists only where it was rendered.

    Raises:
        ValueError: a client id that is not a client of the corpus.
    """
    plan = plan_corpus(config)
    target = corpus_dir(config, Path(cache_dir), plan)
    chosen = _speaker_plans(plan, clients, held_out)
    _create(target, plan)
    missing = [(split, p) for split, p in chosen if not (target / split / p.speaker.speaker_id).is_dir()]
    if missing:
        with _one_torch_thread():
            _write_speakers(missing, target, progress)
    return target


def _create(target: Path, plan: CorpusPlan) -> None:
    """Create `target` holding only its index, in one rename; a directory found there without an
    index is moved aside first (nothing of it is trusted)."""
    incomplete = target.parent / f".{target.name}.incomplete-{os.getpid()}"
    staging = target.parent / f".{target.name}.staging-{os.getpid()}"
    try:
        if target.is_dir() and not (target / INDEX).is_file():
            LOG.warning("corpus %s has no %s: replacing it with a fresh rendering", target, INDEX)
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.rename(target, incomplete)
        if not target.is_dir():
            staging.mkdir(parents=True)
            (staging / INDEX).write_text(json.dumps(_index(plan), indent=1))
            try:
                os.rename(staging, target)
            except OSError:
                if not (target / INDEX).is_file():  # not a lost race with another writer
                    raise
    finally:
        shutil.rmtree(incomplete, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _parse_line(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SpeechDataError(f"{where}: not valid JSON ({e}): fix or delete the line") from e
    if not isinstance(record, dict):
        raise SpeechDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("utterance_id", "speaker_id", "text", "audio") if not isinstance(record.get(k), str)]
    if missing:
        raise SpeechDataError(
            f"{where}: fields {missing} are missing or not strings: each line needs "
            "utterance_id, speaker_id, text and audio"
        )
    return record


def _manifest_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise SpeechDataError(f"manifest {path} does not exist: regenerate the corpus")
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{number}", _parse_line(line, f"{path}:{number}")


def read_manifest(
    path: Path, vocabulary: CharVocabulary | None = None, resampler: ResampleCounter | None = None
) -> list[Utterance]:
    """Load one client's utterances from its ``manifest.jsonl`` and audio files.

    Args:
        path: The manifest; audio paths in it are relative to its folder.
        vocabulary: Transcripts must fit it (default: the workload's character set).
        resampler: Shared resample counter (a fresh one when omitted; then the count is logged here).

    Raises:
        SpeechDataError: See the module docstring; the message names ``manifest.jsonl:<line>``.
    """
    vocabulary = vocabulary or CharVocabulary()
    own = resampler is None
    resample = resampler or ResampleCounter()
    utterances = []
    for where, record in _manifest_records(path):
        _validate_text(vocabulary, record["text"], where)
        try:
            audio, rate = read_wav(path.parent / record["audio"])
        except SpeechDataError as e:
            raise SpeechDataError(f"{where}: {e}") from e
        expected = record.get("num_samples")
        if rate == SAMPLE_RATE and expected is not None and expected != audio.numel():
            raise SpeechDataError(
                f"{where}: manifest says {expected} samples, {record['audio']} holds "
                f"{audio.numel()}: the file was replaced or truncated; regenerate it"
            )
        utterances.append(
            Utterance(record["utterance_id"], record["speaker_id"], record["text"], resample(audio, rate))
        )
    if not utterances:
        raise SpeechDataError(f"manifest {path} lists no utterances: a client needs data; remove the client")
    if own:
        resample.log(str(path), len(utterances))
    return utterances


def read_index(root: Path | str) -> dict[str, Any]:
    """The ``index.json`` of a corpus directory."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise SpeechDataError(f"{path} does not exist: {root} is not a complete corpus; run generate_corpus")
    return json.loads(path.read_text())


def load_split(root: Path | str, split: str, vocabulary: CharVocabulary | None = None) -> ClientData:
    """Read every speaker of ``split`` (one of ``SPLITS``) of a generated corpus.

    Returns:
        Speaker id -> utterances, speakers in index order (train: one speaker per client).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    root = Path(root)
    resample = ResampleCounter()
    data = {
        speaker: read_manifest(root / split / speaker / MANIFEST, vocabulary, resample)
        for speaker in read_index(root)["splits"][split]
    }
    resample.log(f"{root}/{split}", sum(len(v) for v in data.values()))
    return data


# --------------------------------------------------------------------------- LibriSpeech


def _chapter(folder: Path, vocabulary: CharVocabulary, resample: ResampleCounter) -> list[Utterance]:
    speaker, chapter = folder.parent.name, folder.name
    transcript = folder / f"{speaker}-{chapter}.trans.txt"
    if not transcript.is_file():
        raise SpeechDataError(f"{transcript} does not exist: a LibriSpeech chapter folder needs its transcript")
    utterances = []
    for number, line in enumerate(transcript.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{transcript}:{number}"
        utterance_id, _, raw = line.partition(" ")
        text = normalize_transcript(raw)
        if not text:
            raise SpeechDataError(f"{where}: no transcript after the id {utterance_id!r}")
        _validate_text(vocabulary, text, where)
        try:
            audio, rate = read_flac(folder / f"{utterance_id}.flac")
        except SpeechDataError as e:
            raise SpeechDataError(f"{where}: {e}") from e
        utterances.append(Utterance(utterance_id, speaker, text, resample(audio, rate)))
    return utterances


def read_librispeech(
    root: Path | str, split: str, vocabulary: CharVocabulary | None = None, clients: Sequence[int] | None = None
) -> ClientData:
    """Read a LibriSpeech split (e.g. ``"train-clean-100"``) with one client per speaker.

    Args:
        root: The folder holding the split folders (``LibriSpeech/``).
        split: The split folder name.
        vocabulary: Transcripts must fit it after lowercasing (default: the workload's characters).
        clients: Read only these clients (indices into the sorted speakers; None: all), e.g. a
            cluster worker's own; the other speakers' audio is not opened.

    Returns:
        Speaker id -> utterances, speakers and chapters in sorted order.

    Raises:
        SpeechDataError: A folder, transcript or FLAC is missing or malformed; the message names it.
        ValueError: a client id beyond the split's speakers.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise SpeechDataError(
            f"{folder} is not a directory: pass the LibriSpeech root and a split such as 'train-clean-100'"
        )
    vocabulary = vocabulary or CharVocabulary()
    resample = ResampleCounter()
    data: ClientData = {}
    speakers = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
    if clients is not None:
        speakers = [speakers[c] for c in _check_clients(clients, len(speakers))]
    for speaker in speakers:
        chapters = sorted((p for p in speaker.iterdir() if p.is_dir()), key=lambda p: p.name)
        utterances = [u for chapter in chapters for u in _chapter(chapter, vocabulary, resample)]
        if not utterances:
            raise SpeechDataError(f"speaker folder {speaker} holds no utterances: remove it or restore its chapters")
        data[speaker.name] = utterances
    if not data:
        raise SpeechDataError(f"{folder} holds no speaker folders: check the LibriSpeech layout")
    resample.log(str(folder), sum(len(v) for v in data.values()))
    return data

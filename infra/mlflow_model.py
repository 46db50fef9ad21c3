"""A run's compact speech model as an MLflow model: load it with MLflow's own loader and transcribe audio.

```python
import mlflow
mlflow.set_tracking_uri("http://127.0.0.1:5000")          # or sqlite:///<FEDPRUNE_HOME>/mlflow.db
model = mlflow.pyfunc.load_model(f"runs:/{mlflow_run_id}/model")
model.predict(["utterance.wav"])                           # -> ["the transcript"], one per item
mlflow.register_model(f"runs:/{mlflow_run_id}/model", "fedprune-speech")
```

The model directory is MLflow's pyfunc format, saved as "models from code" (nothing pickled):
`artifacts/compact_model.safetensors` holds the compact weights a client downloads
(`fedprune_core.submodel.extract`: pruned weights dropped), `artifacts/model.json` the experiment
configuration and the speech workload's settings, `code/` this package's `fedprune_core` and
`infra`, so the model loads where FedPrune is not installed, and `mlflow_model_entry.py` the
file MLflow runs to build a `CompactSpeechModel`.

The loaded model rebuilds the compact network (`fedprune_core.submodel.build_client_model`: sliced
layers compute only the kept rows and columns) and decodes greedily, as the server's evaluation
does (`fedprune_core.speech.workload.SpeechWorkload`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlflow.pyfunc
import numpy as np
import torch
import torchaudio.functional as AF
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file
from torchaudio.models import RNNT

from fedprune_core.config import ExperimentConfig
from fedprune_core.speech.decode import greedy_decode
from fedprune_core.speech.features import FeatureConfig, log_mel
from fedprune_core.speech.model import ModelConfig
from fedprune_core.speech.synth import SAMPLE_RATE
from fedprune_core.speech.text import CharVocabulary
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.strategies import make_strategy
from fedprune_core.submodel import build_client_model
from infra.speech_data import read_flac, read_wav

if TYPE_CHECKING:
    from infra.tracking import Tracker

MODEL_PATH = "model"
"""The model's artifact path in its MLflow run: ``runs:/<mlflow run id>/model``."""
WEIGHTS, SETTINGS = "compact_model.safetensors", "model.json"
FORMAT = 1
"""Version of `model.json`'s layout."""
AUDIO_COLUMN = "audio"
"""The DataFrame column of the audio when the input has more than one column."""
REQUIREMENTS = ("mlflow", "torch", "torchaudio", "safetensors", "numpy", "pandas", "soundfile")
"""The distributions the model needs, pinned to the versions installed when it is saved."""
ENTRY = Path(__file__).with_name("mlflow_model_entry.py")


def speech_settings(config: ExperimentConfig, workload: SpeechWorkload) -> dict[str, Any]:
    """What `model.json` holds: the configuration (which parameters are pruned, and how) and the
    workload's model sizes, characters, features and decoding cap."""
    return {
        "format": FORMAT,
        "experiment": config.to_dict(),
        "model": dataclasses.asdict(workload.model_config),
        "symbols": workload.vocabulary.symbols,
        "features": dataclasses.asdict(workload.features),
        "max_symbols_per_frame": workload.max_symbols_per_frame,
    }


def workload_from(settings: dict[str, Any]) -> SpeechWorkload:
    """The speech workload `speech_settings` describes (no SpecAugment: it only decodes)."""
    if settings.get("format") != FORMAT:
        raise ValueError(f"model.json format={settings.get('format')!r} is not {FORMAT}: save the model again")
    return SpeechWorkload(
        model=ModelConfig(**settings["model"]),
        vocabulary=CharVocabulary(settings["symbols"]),
        features=FeatureConfig(**settings["features"]),
        spec_augment=None,
        max_symbols_per_frame=settings["max_symbols_per_frame"],
    )


def compact_module(settings: dict[str, Any], payload: dict[str, torch.Tensor]) -> RNNT:
    """The compact network of `payload` (weights as `extract` wrote them), in eval mode: the workload's
    transducer with its pruned layers replaced in place by sliced ones."""
    config = ExperimentConfig.from_dict(settings["experiment"])
    model = workload_from(settings).build_model()
    module = build_client_model(model, payload, make_strategy(config, model).specs).module
    return cast(RNNT, module.eval())


def read_audio(path: str | os.PathLike[str]) -> torch.Tensor:
    """``(N,)`` float32 audio at 16 kHz from a WAV (16-bit PCM mono) or any mono file libsndfile reads."""
    path = Path(path)
    audio, rate = read_wav(path) if path.suffix.lower() == ".wav" else read_flac(path)
    return audio if rate == SAMPLE_RATE else AF.resample(audio, rate, SAMPLE_RATE)


def waveforms(model_input: Sequence[Any]) -> list[torch.Tensor]:
    """The audio of `predict`'s input, one item per utterance: a path of an audio file, a 1-D float
    array of 16 kHz samples, or a mapping with an ``audio`` entry holding either (MLflow passes a
    DataFrame's rows so when it has more columns than ``audio``).

    Raises:
        ValueError: naming an item of another kind.
    """
    return [_waveform(item) for item in model_input]


def _waveform(item: Any) -> torch.Tensor:
    if isinstance(item, Mapping) and AUDIO_COLUMN in item:
        item = item[AUDIO_COLUMN]
    if isinstance(item, str | os.PathLike):
        return read_audio(item)
    array = np.asarray(item, dtype=np.float32) if isinstance(item, np.ndarray | list) else None
    if array is None or array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"input item {str(item)[:60]!r} is not audio: pass per utterance a WAV path, a non-empty 1-D float array "
            f"of 16 kHz samples, or a row with an {AUDIO_COLUMN!r} column holding either"
        )
    return torch.from_numpy(array.copy())


@torch.no_grad()
def transcribe(module: RNNT, workload: SpeechWorkload, audio: list[torch.Tensor]) -> list[str]:
    """Greedy transcripts of `audio` (each ``(N,)`` at 16 kHz), one utterance at a time."""
    texts = []
    for samples in audio:
        features, frames = log_mel(samples[None], torch.tensor([samples.numel()]), workload.features)
        tokens = greedy_decode(module, features, frames, workload.vocabulary.blank, workload.max_symbols_per_frame)
        texts.append(workload.vocabulary.decode(tokens[0]))
    return texts


class CompactSpeechModel(PythonModel):
    """A run's compact Conformer-Transducer: audio in, transcripts out.

    `predict` takes a batch (`waveforms`): a list of WAV paths or of 16 kHz sample arrays, or a
    DataFrame with an ``audio`` column of either; it returns one transcript per utterance. MLflow
    checks the input against the type hint (a list, or what it makes a list of: a DataFrame).
    """

    def load_context(self, context: Any) -> None:
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.workload = workload_from(settings)
        self.module = compact_module(settings, load_file(context.artifacts["weights"]))

    def predict(self, context: Any, model_input: list[Any], params: dict[str, Any] | None = None) -> list[str]:
        return transcribe(self.module, self.workload, waveforms(model_input))


def requirements() -> list[str]:
    """`REQUIREMENTS` pinned to the installed versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_model(path: Path, settings: dict[str, Any], weights: bytes) -> None:
    """Write the MLflow model directory at `path` (which must not exist)."""
    import fedprune_core
    import infra

    with tempfile.TemporaryDirectory(prefix="fedprune-model-") as tmp:
        files = {"weights": Path(tmp) / WEIGHTS, "settings": Path(tmp) / SETTINGS}
        files["weights"].write_bytes(weights)
        files["settings"].write_text(json.dumps(settings, indent=2))
        mlflow.pyfunc.save_model(
            str(path), python_model=str(ENTRY), artifacts={k: str(v) for k, v in files.items()},
            code_paths=[p.__path__[0] for p in (fedprune_core, infra)],
            pip_requirements=requirements(),
        )


def log_model(tracker: Tracker, settings: dict[str, Any], weights: bytes) -> None:
    """Save the model and store it as artifact `MODEL_PATH` of `tracker`'s run.

    `mlflow.pyfunc.log_model` would need MLflow's global tracking URI and active run (`Tracker`
    keeps none); `save_model` writes the same directory, which the client then uploads.
    """
    with tempfile.TemporaryDirectory(prefix="fedprune-mlflow-model-") as tmp:
        save_model(Path(tmp) / MODEL_PATH, settings, weights)
        tracker.log_artifact_dir(MODEL_PATH, Path(tmp) / MODEL_PATH)

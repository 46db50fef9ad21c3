"""The compact speech model as an MLflow model, without servers: saved, loaded by MLflow, transcribing
as the masked full model does; what its input may be."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from fedprune_core.engine import ServerState, init_state, masked_weights, round_masks
from fedprune_core.presets import preset
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.strategies import make_strategy
from fedprune_core.submodel import extract
from infra.mlflow_model import requirements, save_model, speech_settings, transcribe, waveforms
from infra.speech_data import write_wav
from infra.storage import tensors_to_bytes


def noise(seconds: float, seed: int, rate: int = 16_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(int(seconds * rate), generator=g) - 0.5) * 0.2


def test_a_saved_model_loads_with_mlflow_and_transcribes_as_the_masked_full_model(tmp_path: Path) -> None:
    config = preset("tiny")
    workload = SpeechWorkload(model=config.model)
    strategy = make_strategy(config, workload.build_model())
    start = init_state(workload, config.seed)
    scores, masks = round_masks(strategy, start, config.schedule.sparsify_rounds)  # the target sparsity
    state = ServerState(config.schedule.sparsify_rounds, start.weights, masks, scores)
    save_model(tmp_path / "model", speech_settings(config, workload), tensors_to_bytes(
        extract(state.weights, masks, strategy.specs)))
    assert not list((tmp_path / "model").rglob("*.pkl"))
    wavs = [tmp_path / f"{i}.wav" for i in range(2)]
    for i, wav in enumerate(wavs):
        write_wav(wav, noise(1.0 + i / 2, seed=i))

    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    texts = loaded.predict([str(w) for w in wavs])
    full = workload.build_model()
    full.load_state_dict(masked_weights(state), strict=False)
    assert texts == transcribe(full.eval(), workload, waveforms([str(w) for w in wavs]))
    assert all(isinstance(t, str) for t in texts) and any(texts)  # an untrained model emits characters


def test_inputs_are_paths_arrays_or_rows_and_audio_is_resampled_to_16_khz(tmp_path: Path) -> None:
    write_wav(tmp_path / "slow.wav", noise(0.5, seed=3, rate=8000), sample_rate=8000)
    array = noise(0.25, seed=4).numpy()
    got = waveforms([str(tmp_path / "slow.wav"), array, {"audio": array, "id": 7}, list(array)])
    assert [w.numel() for w in got] == [8000, 4000, 4000, 4000]
    assert torch.equal(got[1], torch.from_numpy(array)) and torch.equal(got[2], got[1])


@pytest.mark.parametrize("bad", [3, np.zeros((2, 5), dtype=np.float32), np.zeros(0, dtype=np.float32), {"x": "a.wav"}])
def test_an_item_that_is_not_audio_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match=r"is not audio: pass per utterance a WAV path"):
        waveforms([bad])


def test_requirements_pin_the_installed_versions() -> None:
    pinned = dict(r.split("==") for r in requirements())
    assert pinned["mlflow"] == mlflow.__version__ and pinned["torch"] == torch.__version__.split("+")[0]  # no +cu130
    assert set(pinned) == {"mlflow", "torch", "torchaudio", "safetensors", "numpy", "pandas", "soundfile"}

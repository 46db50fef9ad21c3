"""Checkpoints on both backends: layout, verification, crash safety, retention, listing."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from infra.checkpoint import Checkpoint, CheckpointStore, RunSummary, list_runs
from infra.errors import CheckpointNotFoundError, CorruptCheckpointError
from infra.storage import LocalStorage, Storage, get_json, sha256_hex


def _tensors(round_num: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(round_num)
    weights = torch.randn(4, 3, generator=g)
    return {
        "state": {"layer.weight": weights, "layer.bias": torch.full((4,), float(round_num))},
        "masks": {"layer.weight": weights.abs() > 0.5},
    }


def _meta(round_num: int) -> dict[str, Any]:
    return {"phase": "sparsify", "rng": [round_num, 7], "mlflow_run_id": "abc"}


def _assert_is_round(checkpoint: Checkpoint | None, round_num: int) -> None:
    assert checkpoint is not None and checkpoint.round_num == round_num
    expected = _tensors(round_num)
    assert checkpoint.tensors.keys() == expected.keys()
    for name, group in expected.items():
        for key, tensor in group.items():
            assert torch.equal(checkpoint.tensors[name][key], tensor), (name, key)
            assert checkpoint.tensors[name][key].dtype == tensor.dtype
    assert checkpoint.meta == _meta(round_num)


@pytest.fixture
def ckpt(storage: Storage) -> CheckpointStore:
    return CheckpointStore(storage, "exp", "run-1")


class CrashAt:
    """A storage that raises on the first write of a key ending with `suffix` (a simulated crash)."""

    def __init__(self, inner: Storage, suffix: str) -> None:
        self.inner, self.suffix = inner, suffix

    @property
    def url(self) -> str:
        return self.inner.url

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(self.suffix):
            raise OSError(f"simulated crash before writing {key}")
        self.inner.put_bytes(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- layout and round trip


def test_commit_then_load_roundtrips_tensors_meta_and_writes_the_layout(ckpt: CheckpointStore) -> None:
    ckpt.commit(3, _tensors(3), _meta(3))
    _assert_is_round(ckpt.load(), 3)
    assert ckpt.latest_round() == 3
    assert ckpt.storage.list_keys("exp/") == [
        "exp/run-1/LATEST",
        "exp/run-1/rounds/000003/manifest.json",
        "exp/run-1/rounds/000003/masks.safetensors",
        "exp/run-1/rounds/000003/state.safetensors",
    ]
    assert get_json(ckpt.storage, "exp/run-1/LATEST") == {"round": 3}
    manifest = get_json(ckpt.storage, "exp/run-1/rounds/000003/manifest.json")
    state = ckpt.storage.get_bytes("exp/run-1/rounds/000003/state.safetensors")
    assert manifest["round"] == 3 and manifest["meta"] == _meta(3) and manifest["created"].endswith("Z")
    assert manifest["objects"]["state"] == {"sha256": sha256_hex(state), "size": len(state)}


def test_config_is_written_once_and_never_changed_once_a_round_is_committed(ckpt: CheckpointStore) -> None:
    assert not ckpt.exists()
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        ckpt.read_config()
    config = {"seed": 1, "prune": {"sparsity": 0.5, "pattern": "unstructured"}, "rounds": (1, 2)}
    ckpt.write_config(config)
    ckpt.write_config(config)  # the same config again is fine (resume)
    assert ckpt.exists()
    assert ckpt.read_config() == {
        "seed": 1,
        "prune": {"sparsity": 0.5, "pattern": "unstructured"},
        "rounds": [1, 2],
    }
    # Nothing committed yet (the run failed while starting): a corrected config may replace it.
    ckpt.write_config({**config, "seed": 2})
    assert ckpt.read_config()["seed"] == 2
    ckpt.write_config(config)
    ckpt.commit(0, _tensors(0), _meta(0))
    with pytest.raises(ValueError, match=r"different config .*\['prune'\]"):
        ckpt.write_config({**config, "prune": {"sparsity": 0.9}})
    assert ckpt.read_config()["prune"] == {"sparsity": 0.5, "pattern": "unstructured"}


@pytest.mark.parametrize("run_id", ["", "a/b", "..", "a b", "a.b", "x" * 65, "ü"])
def test_run_id_must_be_safe(run_id: str) -> None:
    with pytest.raises(ValueError, match=r"run_id=.*\[A-Za-z0-9_-\]"):
        CheckpointStore(LocalStorage("/tmp/unused"), "exp", run_id)


@pytest.mark.parametrize("name", ["manifest", "a/b", "a.b", ""])
def test_object_names_must_be_safe(tmp_path: Any, name: str) -> None:
    ckpt = CheckpointStore(LocalStorage(tmp_path), "exp", "r")
    with pytest.raises(ValueError, match="checkpoint object name"):
        ckpt.commit(0, {name: {"w": torch.zeros(1)}}, {})


def test_meta_must_be_json_and_nothing_is_written_otherwise(ckpt: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="meta is not JSON-serializable"):
        ckpt.commit(0, _tensors(0), {"bad": torch.zeros(1)})
    assert ckpt.storage.list_keys("exp/") == []


# --------------------------------------------------------------------------- ordering


def test_commits_only_move_forward_and_an_identical_recommit_is_a_no_op(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.commit(2, _tensors(2), _meta(2))
    ckpt.commit(2, _tensors(2), _meta(2))  # a retried task
    with pytest.raises(ValueError, match="round_num=1 is older than the committed LATEST=2"):
        ckpt.commit(1, _tensors(1), _meta(1))
    with pytest.raises(ValueError, match="already committed with different tensors"):
        ckpt.commit(2, _tensors(5), _meta(2))
    _assert_is_round(ckpt.load(), 2)


# --------------------------------------------------------------------------- crashes and corruption


@pytest.mark.parametrize("crash_before", ["masks.safetensors", "manifest.json", "LATEST"])
def test_a_crash_during_commit_leaves_the_previous_checkpoint(
    ckpt: CheckpointStore, crash_before: str
) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    crashing = CheckpointStore(CrashAt(ckpt.storage, crash_before), "exp", "run-1")  # type: ignore[arg-type]
    with pytest.raises(OSError, match="simulated crash"):
        crashing.commit(2, _tensors(2), _meta(2))
    assert ckpt.latest_round() == 1
    _assert_is_round(ckpt.load(), 1)
    _assert_is_round(ckpt.load_latest_valid(), 1)
    ckpt.commit(2, _tensors(2), _meta(2))  # the resumed run redoes round 2
    _assert_is_round(ckpt.load_latest_valid(), 2)


def test_a_round_without_manifest_was_never_committed(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.storage.put_bytes(ckpt.object_key(2, "state"), b"half-written round")
    assert ckpt.committed_rounds() == [1]
    with pytest.raises(CheckpointNotFoundError, match="round 2 .* never committed"):
        ckpt.load(2)
    _assert_is_round(ckpt.load_latest_valid(), 1)


def test_a_flipped_byte_is_detected_and_the_reader_falls_back(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.commit(2, _tensors(2), _meta(2))
    key = ckpt.object_key(2, "masks")
    data = bytearray(ckpt.storage.get_bytes(key))
    data[-1] ^= 0xFF
    ckpt.storage.put_bytes(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="rounds/000002/masks.safetensors fails its check"):
        ckpt.load()
    _assert_is_round(ckpt.load_latest_valid(), 1)
    ckpt.commit(2, _tensors(2), _meta(2))  # LATEST no longer verifies, so round 2 may be rewritten
    _assert_is_round(ckpt.load(), 2)


def test_a_missing_object_is_named(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.storage.delete(ckpt.object_key(1, "state"))
    with pytest.raises(CorruptCheckpointError, match="state.safetensors is missing"):
        ckpt.load()
    assert ckpt.load_latest_valid() is None


def test_an_unreadable_latest_falls_back_to_manifests(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.commit(2, _tensors(2), _meta(2))
    ckpt.storage.put_bytes(ckpt.latest_key, b"{not json")
    with pytest.raises(CorruptCheckpointError, match="LATEST is not"):
        ckpt.latest_round()
    _assert_is_round(ckpt.load_latest_valid(), 2)


def test_nothing_committed(ckpt: CheckpointStore) -> None:
    assert ckpt.latest_round() is None and ckpt.load_latest_valid() is None
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load()


# --------------------------------------------------------------------------- retention, artifacts, runs


def test_retention_keeps_the_last_k_and_every_mth_and_never_latest(ckpt: CheckpointStore) -> None:
    small = {"state": {"w": torch.zeros(1)}}
    for round_num in range(13):
        ckpt.commit(round_num, small, {})
    ckpt.storage.put_bytes(ckpt.object_key(13, "state"), b"in progress")  # newer than LATEST: untouched
    deleted = ckpt.apply_retention(keep_last=3, keep_every=5)
    assert deleted == [1, 2, 3, 4, 6, 7, 8, 9]
    assert ckpt.committed_rounds() == [0, 5, 10, 11, 12]
    assert ckpt.storage.exists(ckpt.object_key(13, "state"))
    assert ckpt.storage.list_keys(ckpt.round_prefix(4)) == []
    assert ckpt.apply_retention(keep_last=1, keep_every=0) == [0, 5, 10, 11]
    assert ckpt.load().round_num == 12


def test_retention_arguments_are_validated(ckpt: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="keep_last=0 must be >= 1"):
        ckpt.apply_retention(keep_last=0, keep_every=5)
    with pytest.raises(ValueError, match="keep_every=-1 must be >= 0"):
        ckpt.apply_retention(keep_last=1, keep_every=-1)


def test_artifacts_live_under_final(ckpt: CheckpointStore) -> None:
    ckpt.put_artifact("model.safetensors", b"compact")
    assert ckpt.get_artifact("model.safetensors") == b"compact"
    assert ckpt.storage.exists("exp/run-1/final/model.safetensors")


def test_list_runs_finds_runs_with_their_latest_round(storage: Storage) -> None:
    a = CheckpointStore(storage, "exp-a", "r1")
    a.write_config({"x": 1})
    a.commit(4, {"state": {"w": torch.zeros(1)}}, {})
    CheckpointStore(storage, "exp-a", "r2").write_config({"x": 2})
    CheckpointStore(storage, "exp-b", "r1").write_config({"x": 3})
    storage.put_bytes("exp-b/stray.json", json.dumps({}).encode())
    assert list_runs(storage) == [
        RunSummary("exp-a", "r1", 4),
        RunSummary("exp-a", "r2", None),
        RunSummary("exp-b", "r1", None),
    ]
    assert list_runs(storage, "exp-b") == [RunSummary("exp-b", "r1", None)]

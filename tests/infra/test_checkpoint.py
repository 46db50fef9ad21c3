"""Checkpoints on both backends: layout, verification, crash safety, retention, listing."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from infra.checkpoint import TMP_MAX_AGE_S, Checkpoint, CheckpointStore, RunSummary, list_runs
from infra.errors import CheckpointNotFoundError, CorruptCheckpointError, UnrecoverableRunError
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


def _recovered(ckpt: CheckpointStore) -> Checkpoint:
    """The checkpoint a resumed run starts from (after `recover`)."""
    plan = ckpt.recover()
    assert plan.round_num is not None
    return ckpt.load(plan.round_num)


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
    _assert_is_round(_recovered(ckpt), 1)
    ckpt.commit(2, _tensors(2), _meta(2))  # the resumed run redoes round 2
    _assert_is_round(_recovered(ckpt), 2)


def test_a_round_without_manifest_was_never_committed(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.storage.put_bytes(ckpt.object_key(2, "state"), b"half-written round")
    assert ckpt.committed_rounds() == [1]
    with pytest.raises(CheckpointNotFoundError, match="round 2 .* never committed"):
        ckpt.load(2)
    _assert_is_round(_recovered(ckpt), 1)
    assert [k.rsplit("/", 1)[1] for k in ckpt.storage.list_keys("exp/run-1/damaged/")] == ["state.safetensors"]
    assert ckpt.storage.list_keys("exp/run-1/damaged/")[0].startswith("exp/run-1/damaged/000002-uncommitted-")


def test_a_flipped_byte_is_detected_and_the_reader_falls_back(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.commit(2, _tensors(2), _meta(2))
    key = ckpt.object_key(2, "masks")
    data = bytearray(ckpt.storage.get_bytes(key))
    data[-1] ^= 0xFF
    ckpt.storage.put_bytes(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="rounds/000002/masks.safetensors fails its check"):
        ckpt.load()
    assert ckpt.plan_recovery().round_num == 1
    ckpt.commit(2, _tensors(2), _meta(2))  # LATEST no longer verifies, so round 2 may be rewritten
    _assert_is_round(ckpt.load(), 2)


def test_a_missing_object_is_named(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.storage.delete(ckpt.object_key(1, "state"))
    with pytest.raises(CorruptCheckpointError, match="state.safetensors is missing"):
        ckpt.load()
    with pytest.raises(UnrecoverableRunError, match=r"'exp/run-1' .* none verifies .*rounds: 1 \(missing-object\)"):
        ckpt.plan_recovery()


def test_an_unreadable_latest_falls_back_to_manifests(ckpt: CheckpointStore) -> None:
    ckpt.commit(1, _tensors(1), _meta(1))
    ckpt.commit(2, _tensors(2), _meta(2))
    ckpt.storage.put_bytes(ckpt.latest_key, b"{not json")
    with pytest.raises(CorruptCheckpointError, match="LATEST is not"):
        ckpt.latest_round()
    _assert_is_round(_recovered(ckpt), 2)


def test_nothing_committed(ckpt: CheckpointStore) -> None:
    plan = ckpt.recover()
    assert ckpt.latest_round() is None and plan.round_num is None and plan.warning is None
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load()


# --------------------------------------------------------------------------- recovery of a damaged run


def _flip_state(ckpt: CheckpointStore) -> None:
    key = ckpt.object_key(3, "state")
    data = bytearray(ckpt.storage.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    ckpt.storage.put_bytes(key, bytes(data))


def _truncate_manifest(ckpt: CheckpointStore) -> None:
    key = ckpt.manifest_key(3)
    ckpt.storage.put_bytes(key, ckpt.storage.get_bytes(key)[:40])


DAMAGES: dict[str, tuple[Callable[[CheckpointStore], None], int, str]] = {
    # damage -> (how, the round resumed from, the reason round 3 is set aside under or "" if it stays)
    "flipped-state": (_flip_state, 2, "checksum"),
    "truncated-manifest": (_truncate_manifest, 2, "bad-manifest"),
    "deleted-state": (lambda c: c.storage.delete(c.object_key(3, "state")), 2, "missing-object"),
    "garbage-latest": (lambda c: c.storage.put_bytes(c.latest_key, b"\x00garbage"), 3, ""),
    "deleted-latest": (lambda c: c.storage.delete(c.latest_key), 3, ""),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_recover_resumes_from_the_newest_round_that_verifies_and_sets_the_damage_aside(
    ckpt: CheckpointStore, damage: str
) -> None:
    how, resumed, reason = DAMAGES[damage]
    for round_num in (1, 2, 3):
        ckpt.commit(round_num, _tensors(round_num), _meta(round_num))
    how(ckpt)
    round_3 = {k.rsplit("/", 1)[1]: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys(ckpt.round_prefix(3))}

    plan = ckpt.plan_recovery()
    assert ckpt.storage.list_keys("exp/run-1/damaged/") == []  # planning changes nothing
    assert ckpt.recover() == plan
    assert plan.round_num == resumed and plan.meta == _meta(resumed)
    _assert_is_round(ckpt.load(), resumed)  # LATEST names it
    assert plan.warning is not None and f"resumes from round {resumed}" in plan.warning
    aside = ckpt.storage.list_keys("exp/run-1/damaged/")
    if reason:
        assert [d.round_num for d in plan.damaged] == [3] and plan.damaged[0].reason == reason
        assert f"round 3 ({reason})" in plan.warning
        folder = aside[0].split("/")[3]
        assert folder.startswith(f"000003-{reason}-")
        assert {k.rsplit("/", 1)[1]: ckpt.storage.get_bytes(k) for k in aside} == round_3  # as found
        assert ckpt.storage.list_keys(ckpt.round_prefix(3)) == []
    elif damage == "garbage-latest":
        assert [k.split("/", 3)[3].split("/")[1] for k in aside] == ["LATEST"]
        assert ckpt.storage.get_bytes(aside[0]) == b"\x00garbage"
        assert "LATEST was unreadable" in plan.warning
    else:
        assert aside == [] and "LATEST was missing" in plan.warning
    ckpt.commit(resumed + 1, _tensors(resumed + 1), _meta(resumed + 1))  # the resumed run moves forward
    _assert_is_round(ckpt.load(), resumed + 1)
    again = ckpt.recover()
    assert again.warning is None and ckpt.storage.list_keys("exp/run-1/damaged/") == aside


def test_rounds_newer_than_a_verifying_latest_are_set_aside_intact(ckpt: CheckpointStore) -> None:
    for round_num in range(5):
        ckpt.commit(round_num, _tensors(round_num), _meta(round_num))
    newer = {k: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys("exp/run-1/rounds/")
             if int(k.split("/")[3]) > 2}
    ckpt.storage.put_bytes(ckpt.latest_key, b'{"round": 2}')  # e.g. LATEST restored from an older backup
    plan = ckpt.recover()
    assert plan.round_num == 2 and [(d.round_num, d.reason) for d in plan.damaged] == [(3, "uncommitted"),
                                                                                      (4, "uncommitted")]
    assert plan.warning == (
        "run 'exp/run-1' resumes from round 2, the newest round that verifies; "
        "set aside under exp/run-1/damaged/: round 3 (uncommitted), round 4 (uncommitted)"
    )
    aside = ckpt.storage.list_keys("exp/run-1/damaged/")
    assert sorted(ckpt.storage.get_bytes(k) for k in aside) == sorted(newer.values())
    assert ckpt.committed_rounds() == [0, 1, 2]


def test_a_run_whose_rounds_all_fail_is_not_started_over(ckpt: CheckpointStore) -> None:
    for round_num in (1, 2):
        ckpt.commit(round_num, _tensors(round_num), _meta(round_num))
        ckpt.storage.put_bytes(ckpt.object_key(round_num, "masks"), b"scrambled")
    keys = {k: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys("")}
    message = r"'exp/run-1' .* none verifies \(LATEST: round 2; rounds: 1 \(checksum\), 2 \(checksum\)\)"
    for attempt in (ckpt.plan_recovery, ckpt.recover):
        with pytest.raises(UnrecoverableRunError, match=message):
            attempt()
    assert {k: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys("")} == keys  # nothing moved
    ckpt.storage.delete_prefix("exp/run-1/rounds/")
    with pytest.raises(UnrecoverableRunError, match=r"LATEST: round 2; rounds: none"):
        ckpt.plan_recovery()  # LATEST alone says a round was committed


def test_leftovers_of_a_first_commit_that_died_are_set_aside_and_the_run_starts_at_0(ckpt: CheckpointStore) -> None:
    ckpt.storage.put_bytes(ckpt.object_key(0, "state"), b"half of round 0")
    plan = ckpt.recover()
    assert plan.round_num is None and plan.meta == {}
    assert plan.warning is not None and "starts from round 0" in plan.warning
    assert ckpt.storage.list_keys(ckpt.round_prefix(0)) == []
    assert len(ckpt.storage.list_keys("exp/run-1/damaged/")) == 1


def test_a_round_damaged_twice_is_set_aside_twice(ckpt: CheckpointStore) -> None:
    for _ in range(2):
        ckpt.commit(1, _tensors(1), _meta(1))
        ckpt.commit(2, _tensors(2), _meta(2))
        ckpt.storage.delete(ckpt.object_key(2, "masks"))
        assert ckpt.recover().round_num == 1
    folders = {k.split("/")[3] for k in ckpt.storage.list_keys("exp/run-1/damaged/")}
    assert len(folders) == 2 and all(f.startswith("000002-missing-object-") for f in folders)


@pytest.mark.parametrize("latest", ["older", "garbage", "missing"])
def test_retention_never_deletes_verified_rounds_newer_than_the_resume_point(
    ckpt: CheckpointStore, latest: str
) -> None:
    small = {"state": {"w": torch.zeros(1)}}
    for round_num in range(10):
        ckpt.commit(round_num, {"state": {"w": torch.full((1,), float(round_num))}}, {})
    stored = {k: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys("exp/run-1/rounds/")}
    if latest == "older":
        ckpt.storage.put_bytes(ckpt.latest_key, b'{"round": 6}')
    elif latest == "garbage":
        ckpt.storage.put_bytes(ckpt.latest_key, b"{")
    else:
        ckpt.storage.delete(ckpt.latest_key)
    assert ckpt.apply_retention(keep_last=1, keep_every=0) == ([0, 1, 2, 3, 4, 5] if latest == "older" else [])
    assert ckpt.committed_rounds() == ([6, 7, 8, 9] if latest == "older" else list(range(10)))
    resumed = ckpt.recover().round_num
    assert resumed == (6 if latest == "older" else 9)
    ckpt.commit(resumed + 1, small, {})
    ckpt.apply_retention(keep_last=1, keep_every=0)
    assert ckpt.committed_rounds() == [resumed + 1]
    # every verified round newer than the resume point still exists, byte for byte, under damaged/
    aside = {k.split("/")[3][:6]: ckpt.storage.get_bytes(k) for k in ckpt.storage.list_keys("exp/run-1/damaged/")
             if k.endswith("state.safetensors")}
    newer = {k.split("/")[3]: v for k, v in stored.items() if k.endswith("state.safetensors")
             and int(k.split("/")[3]) > resumed}
    assert aside == newer


def _leftover(storage: LocalStorage, key: str, age_s: float) -> str:
    """A temporary file as a write killed before its rename leaves it, last written `age_s` ago."""
    folder = storage.root.joinpath(*key.split("/")[:-1])
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f".tmp-{key.rsplit('/', 1)[1]}.", dir=folder)
    os.close(fd)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return os.path.relpath(path, storage.root)


def test_temporaries_of_killed_writes_are_removed_old_ones_after_commits_all_on_resume(tmp_path: Any) -> None:
    storage = LocalStorage(tmp_path)
    ckpt = CheckpointStore(storage, "exp", "run-1")
    ckpt.commit(1, _tensors(1), _meta(1))
    old = _leftover(storage, ckpt.object_key(2, "state"), age_s=2 * TMP_MAX_AGE_S)
    recent = _leftover(storage, ckpt.latest_key, age_s=1)
    other_run = _leftover(storage, "exp/run-2/LATEST", age_s=2 * TMP_MAX_AGE_S)
    assert storage.list_keys("") == ["exp/run-1/LATEST", *(ckpt.round_prefix(1) + n for n in (
        "manifest.json", "masks.safetensors", "state.safetensors"))]  # listings never show them
    ckpt.apply_retention(keep_last=3, keep_every=0)
    assert not (tmp_path / old).exists() and not (tmp_path / old).parent.exists()  # its empty round dir too
    assert (tmp_path / recent).exists() and (tmp_path / other_run).exists()  # may still be being written
    ckpt.recover()  # a run opened for resume: no write of it is running, every leftover is dead
    assert not (tmp_path / recent).exists() and (tmp_path / other_run).exists()
    _assert_is_round(ckpt.load(), 1)


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

"""One suite for every storage backend (local directory, SeaweedFS S3, each with and without the
read-through cache), plus backend-specific checks: atomic local writes, S3 paging, fast and
clear reachability errors that never show credentials."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.errors import StorageKeyError, StorageUnreachableError
from infra.storage import (
    CachingStorage,
    LocalStorage,
    S3Storage,
    Storage,
    check_reachable,
    get_json,
    make_s3_client,
    open_storage,
    put_json,
    tensors_from_bytes,
    tensors_to_bytes,
)
from tests.servers import S3Server, free_port


@pytest.fixture(params=["plain", "cached"])
def store(request: pytest.FixtureRequest, storage: Storage) -> Storage:
    """Each backend of the `storage` fixture, bare and behind a `CachingStorage`."""
    return storage if request.param == "plain" else CachingStorage(storage, cacheable=lambda key: True)


# --------------------------------------------------------------------------- the shared contract


def test_put_get_roundtrip_and_overwrite(store: Storage) -> None:
    store.put_bytes("a/b/c.bin", b"\x00\x01binary")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01binary"
    store.put_bytes("a/b/c.bin", b"second")
    assert store.get_bytes("a/b/c.bin") == b"second"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_missing_key_raises_storage_key_error_naming_it(store: Storage) -> None:
    with pytest.raises(StorageKeyError, match="nope/x.json") as info:
        store.get_bytes("nope/x.json")
    assert isinstance(info.value, KeyError)
    assert info.value.key == "nope/x.json"


def test_exists(store: Storage) -> None:
    assert not store.exists("k/v")
    store.put_bytes("k/v", b"1")
    assert store.exists("k/v")
    assert not store.exists("k")  # a "directory" is not an object


def test_list_keys_is_sorted_recursive_and_a_string_prefix(store: Storage) -> None:
    for key in ["b/2", "a/b/c", "a/bc", "a/b/d/e", "z"]:
        store.put_bytes(key, key.encode())
    assert store.list_keys("") == ["a/b/c", "a/b/d/e", "a/bc", "b/2", "z"]
    assert store.list_keys("a/") == ["a/b/c", "a/b/d/e", "a/bc"]
    assert store.list_keys("a/b") == ["a/b/c", "a/b/d/e", "a/bc"]
    assert store.list_keys("a/b/") == ["a/b/c", "a/b/d/e"]
    assert store.list_keys("missing/") == []


def test_delete_and_delete_prefix(store: Storage) -> None:
    for key in ["r/1/x", "r/1/y", "r/10/x", "r/2/x"]:
        store.put_bytes(key, b"v")
    store.delete("r/2/x")
    store.delete("r/2/x")  # deleting a missing key is not an error
    assert not store.exists("r/2/x")
    store.delete_prefix("r/1/")
    assert store.list_keys("r/") == ["r/10/x"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a\\b", "a/", "x/.tmp-y"])
def test_invalid_keys_are_refused_naming_the_key(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="storage key"):
        store.get_bytes(key)


def test_json_helpers_write_stable_sorted_json(store: Storage) -> None:
    put_json(store, "c.json", {"b": 1, "a": {"d": [1, 2], "c": None}})
    assert get_json(store, "c.json") == {"a": {"c": None, "d": [1, 2]}, "b": 1}
    assert (
        store.get_bytes("c.json")
        == b'{\n  "a": {\n    "c": null,\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    )


def test_safetensors_objects_roundtrip_through_storage(store: Storage) -> None:
    tensors = {"w": torch.randn(3, 4), "mask": torch.tensor([[True, False], [False, True]])}
    store.put_bytes("t.safetensors", tensors_to_bytes(tensors, {"round": "3"}))
    loaded = tensors_from_bytes(store.get_bytes("t.safetensors"))
    assert loaded.keys() == tensors.keys()
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["mask"].dtype == torch.bool
    assert torch.equal(loaded["mask"], tensors["mask"])


# --------------------------------------------------------------------------- tensors


def test_tensors_to_bytes_handles_views_non_contiguous_and_empty() -> None:
    fused = torch.arange(12.0).reshape(6, 2)  # e.g. a fused q/k/v projection
    q, k, v = fused.split(2)
    tensors = {
        "q": q,
        "k": k,
        "v": v,
        "t": fused.t(),
        "e": torch.empty(0, 3),
        "i": torch.tensor([7], dtype=torch.int64),
    }
    loaded = tensors_from_bytes(tensors_to_bytes(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert tensors_from_bytes(tensors_to_bytes({})) == {}


def test_tensor_metadata_must_be_strings() -> None:
    with pytest.raises(ValueError, match="must be str"):
        tensors_to_bytes({"a": torch.zeros(1)}, {"round": 3})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- local backend


def test_local_write_is_atomic_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("x/LATEST", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.put_bytes("x/LATEST", b"new")
    assert store.get_bytes("x/LATEST") == b"old"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["LATEST"]


def test_local_listing_ignores_leftover_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("d/a", b"1")
    (tmp_path / "d" / ".tmp-a.crashed").write_bytes(b"half")
    assert store.list_keys("") == ["d/a"]


def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put_bytes("a/b/c", b"1")
    store.delete_prefix("a/")
    assert list((tmp_path / "root").iterdir()) == []


_segment = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".tmp-")
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=4))
def test_any_valid_key_roundtrips_locally(
    tmp_path_factory: pytest.TempPathFactory, segments: list[str]
) -> None:
    store = LocalStorage(tmp_path_factory.mktemp("prop"))
    key = "/".join(segments)
    store.put_bytes(key, key.encode())
    assert store.list_keys("") == [key]
    assert store.get_bytes(key) == key.encode()


# --------------------------------------------------------------------------- cache


def test_cache_serves_immutable_objects_and_always_rereads_mutable_ones(tmp_path: Path) -> None:
    inner = LocalStorage(tmp_path)
    cached = CachingStorage(inner)
    cached.put_bytes("r/state.safetensors", b"tensors")
    cached.put_bytes("r/LATEST", b"1")
    inner.put_bytes("r/LATEST", b"2")  # another process commits
    inner.delete("r/state.safetensors")
    assert cached.get_bytes("r/state.safetensors") == b"tensors"  # served from memory
    assert cached.get_bytes("r/LATEST") == b"2"  # never cached


def test_cache_evicts_least_recently_used_beyond_max_bytes(tmp_path: Path) -> None:
    inner = LocalStorage(tmp_path)
    cached = CachingStorage(inner, max_bytes=10)
    cached.put_bytes("a.safetensors", b"12345")
    cached.put_bytes("b.safetensors", b"12345")
    cached.get_bytes("a.safetensors")  # a is now the most recent
    cached.put_bytes("c.safetensors", b"12345")  # evicts b
    for key in ["a.safetensors", "b.safetensors", "c.safetensors"]:
        inner.delete(key)
    assert cached.get_bytes("a.safetensors") == b"12345"
    assert cached.get_bytes("c.safetensors") == b"12345"
    with pytest.raises(StorageKeyError):
        cached.get_bytes("b.safetensors")


# --------------------------------------------------------------------------- opening


def test_open_storage_understands_file_urls_paths_and_s3(tmp_path: Path) -> None:
    by_url = open_storage(tmp_path.as_uri())
    by_path = open_storage(str(tmp_path))
    assert isinstance(by_url, LocalStorage) and by_url.root == tmp_path.resolve()
    assert isinstance(by_path, LocalStorage) and by_path.url == tmp_path.resolve().as_uri()
    s3 = open_storage("s3://my-bucket/team/runs/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "team/runs")
    assert s3.url == "s3://my-bucket/team/runs"


@pytest.mark.parametrize(
    ("url", "rule"),
    [("gs://b/p", "unsupported scheme"), ("s3:///p", "no bucket"), ("s3://B_ad/p", "valid name")],
)
def test_open_storage_rejects_bad_urls(url: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        open_storage(url)


def test_check_reachable_local_creates_the_directory(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "new" / "dir")
    check_reachable(store)
    assert (tmp_path / "new" / "dir").is_dir()


# --------------------------------------------------------------------------- S3 backend


@pytest.mark.integration
def test_s3_listing_and_prefix_delete_page_past_1000_keys(seaweed_s3: S3Server) -> None:
    store = seaweed_s3.storage(prefix="paging")
    keys = [f"k/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b""), keys))
    assert store.list_keys("k/") == keys  # two ListObjectsV2 pages
    store.delete_prefix("k/")  # two DeleteObjects batches
    assert store.list_keys("") == []


def test_check_reachable_fails_fast_on_a_dead_endpoint() -> None:
    secret = "do-not-print-me-123"
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = make_s3_client(endpoint, access_key_id="k", secret_access_key=secret)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as info:
        check_reachable(S3Storage("fedprune", client=client, endpoint_url=endpoint))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert endpoint in message and "unreachable" in message and "FEDPRUNE_S3_ENDPOINT_URL" in message
    assert secret not in message


@pytest.mark.integration
def test_s3_bucket_is_created_on_demand(seaweed_s3: S3Server) -> None:
    store = S3Storage("on-demand-bucket", endpoint_url=seaweed_s3.endpoint_url, client=seaweed_s3.client)
    assert store.list_keys("") == [] and not store.exists("x")
    with pytest.raises(StorageKeyError):
        store.get_bytes("x")
    store.put_bytes("x", b"1")
    assert store.get_bytes("x") == b"1"


@pytest.mark.integration
def test_check_reachable_names_a_missing_bucket_and_can_create_it(seaweed_s3: S3Server) -> None:
    store = S3Storage("not-yet-there", endpoint_url=seaweed_s3.endpoint_url, client=seaweed_s3.client)
    with pytest.raises(StorageUnreachableError, match="'not-yet-there' does not exist"):
        check_reachable(store)
    check_reachable(store, create_bucket=True)
    check_reachable(store)


@pytest.mark.integration
def test_check_reachable_reports_rejected_credentials_without_the_secret(seaweed_s3: S3Server) -> None:
    wrong = "wrong-secret-value-42"
    client = make_s3_client(
        seaweed_s3.endpoint_url, access_key_id=seaweed_s3.access_key_id, secret_access_key=wrong
    )
    store = S3Storage(seaweed_s3.bucket, endpoint_url=seaweed_s3.endpoint_url, client=client)
    with pytest.raises(StorageUnreachableError, match="rejected the credentials") as info:
        check_reachable(store)
    assert wrong not in str(info.value) and seaweed_s3.secret_access_key not in str(info.value)

"""The `Storage` contract, one suite for every backend (local directory, SeaweedFS S3, each with and
without the read-through cache): round trips, missing keys, listing, deleting, key rules."""

from __future__ import annotations

import pytest

from infra.errors import StorageKeyError
from infra.storage import Storage


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

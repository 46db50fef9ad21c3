"""`CachingStorage`: immutable objects served from memory, mutable ones always re-read, LRU eviction."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import StorageKeyError
from infra.storage import CachingStorage, LocalStorage


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


def test_check_reachable_goes_through_the_cache_to_its_backend(tmp_path: Path) -> None:
    cached = CachingStorage(LocalStorage(tmp_path / "new" / "dir"))
    cached.check_reachable()
    assert (tmp_path / "new" / "dir").is_dir()

"""`LocalStorage`: atomic writes, leftover temporaries, empty directories, any valid key, reachability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.storage import LocalStorage, check_reachable


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


def test_check_reachable_local_creates_the_directory(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "new" / "dir")
    check_reachable(store)
    assert (tmp_path / "new" / "dir").is_dir()

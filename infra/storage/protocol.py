"""The `Storage` protocol every backend implements, and the rules for its keys.

A backend holds opaque bytes under '/'-separated keys (DESIGN.md, "Storage layout"); code above
it (checkpoints, tasks) never knows where its objects live. Keys are validated here, once, for
every backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

TMP_PREFIX = ".tmp-"
"""Key segments starting with this are reserved for a backend's temporary files (unfinished writes)."""


@runtime_checkable
class Storage(Protocol):
    """Bytes under '/'-separated keys; the same contract on every backend.

    Keys are relative ('a/b/c.json'): no leading '/', no empty, '.' or '..' segment, no backslash.
    """

    @property
    def url(self) -> str:
        """Where the objects live, e.g. ``file:///abs/path`` or ``s3://bucket/prefix``."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically per object (readers see old or new, never half)."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Return the object under `key`; raise `StorageKeyError` if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under `key`."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Return every key starting with `prefix` (a string prefix, recursive), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object under `key`; deleting a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with `prefix`."""
        ...

    def check_reachable(self, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
        """Fail fast, with a clear message, if this storage cannot be used.

        Args:
            create_bucket: create a missing bucket (or equivalent) instead of failing.
            timeout_s: how long to wait for a remote endpoint to answer.

        Raises:
            StorageUnreachableError: naming the endpoint or directory, the rule, and the fix. Never
                contains credentials.
        """
        ...


def validate_key(key: str) -> str:
    """Check that `key` is a safe relative object key and return it.

    Args:
        key: e.g. ``"exp/run-1/rounds/000003/state.safetensors"``.

    Returns:
        `key` unchanged.

    Raises:
        ValueError: naming the key, the rule it breaks and how to fix it.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key {key!r} must be a non-empty string: pass e.g. 'exp/run/config.json'")
    _validate_segments(key, key.split("/"), what="storage key")
    return key


def validate_prefix(prefix: str) -> str:
    """Check that `prefix` is '' or a safe key prefix (it may end with '/') and return it.

    Raises:
        ValueError: naming the prefix, the rule it breaks and how to fix it.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"storage prefix {prefix!r} must be a string: pass e.g. 'exp/run/' or ''")
    if prefix:
        segments = prefix.split("/")
        _validate_segments(prefix, segments[:-1] if prefix.endswith("/") else segments, "storage prefix")
    return prefix


def _validate_segments(value: str, segments: list[str], what: str) -> None:
    rule = "'/'-separated segments, no leading '/', no empty, '.' or '..' segment, no backslash"
    fix = "pass a relative key such as 'exp/run/rounds/000001/state.safetensors'"
    if "\\" in value or "\x00" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{what} {value!r} contains a backslash or control character: use {rule}; {fix}")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"{what} {value!r} has segment {segment!r}: use {rule}; {fix}")
        if segment.startswith(TMP_PREFIX):
            raise ValueError(f"{what} {value!r}: segments starting with {TMP_PREFIX!r} are reserved; {fix}")

"""`CachingStorage`: an in-process, read-through LRU cache of immutable objects in front of any `Storage`.

Within one process it avoids re-reading what was just written (DESIGN.md, "Data between tasks").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from infra.storage.protocol import Storage, validate_prefix


def _is_safetensors(key: str) -> bool:
    return key.endswith(".safetensors")


class CachingStorage:
    """Read-through, write-through LRU cache in front of another `Storage`, for one process.

    Only keys accepted by `cacheable` are cached: by default ``*.safetensors`` objects, which the
    checkpoint layout never rewrites with different content. Mutable keys such as ``LATEST``
    always go to the backend, so another process's commit is seen at once.

    Args:
        inner: the storage holding the objects.
        max_bytes: total cached bytes before the least recently used objects are dropped.
        cacheable: which keys may be cached.
    """

    def __init__(
        self,
        inner: Storage,
        max_bytes: int = 256 * 2**20,
        cacheable: Callable[[str], bool] = _is_safetensors,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0: pass e.g. 256 * 2**20 for 256 MiB")
        self.inner = inner
        self.max_bytes = max_bytes
        self._cacheable = cacheable
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The inner storage's URL."""
        return self.inner.url

    def _remember(self, key: str, data: bytes) -> None:
        if not self._cacheable(key) or len(data) > self.max_bytes:
            return
        with self._lock:
            self._size -= len(self._items.pop(key, b""))
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                self._size -= len(self._items.popitem(last=False)[1])

    def _forget(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._size -= len(self._items.pop(key, b""))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write to the inner storage, then keep a copy."""
        self._forget([key])
        self.inner.put_bytes(key, data)
        self._remember(key, data)

    def get_bytes(self, key: str) -> bytes:
        """Serve from the cache, else read through the inner storage."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = self.inner.get_bytes(key)
        self._remember(key, data)
        return data

    def exists(self, key: str) -> bool:
        """True when cached, else ask the inner storage."""
        with self._lock:
            if key in self._items:
                return True
        return self.inner.exists(key)

    def list_keys(self, prefix: str) -> list[str]:
        """Always listed by the inner storage."""
        return self.inner.list_keys(prefix)

    def delete(self, key: str) -> None:
        """Delete from both."""
        self._forget([key])
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        """Delete from both."""
        validate_prefix(prefix)
        with self._lock:
            doomed = [key for key in self._items if key.startswith(prefix)]
        self._forget(doomed)
        self.inner.delete_prefix(prefix)

    def check_reachable(self, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
        """Checked through to the inner storage (see its `check_reachable`)."""
        self.inner.check_reachable(create_bucket, timeout_s)

"""The storage backends by URL scheme (`SCHEMES`), and what works on any of them.

`open_storage` looks a URL's scheme up in `SCHEMES`; a new backend is one module implementing
`Storage` (its reachability check included) plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from infra.storage.cache import CachingStorage
from infra.storage.local import LocalStorage, open_file_url, open_path
from infra.storage.protocol import Storage
from infra.storage.s3 import open_s3_url


@dataclass(frozen=True)
class Scheme:
    """How to open the storage of one URL scheme.

    Attributes:
        open: (url, endpoint_url) -> the storage; raises ValueError naming what is wrong in the URL.
        example: what a user may write, shown when a scheme is unknown.
    """

    open: Callable[[str, str | None], Storage]
    example: str


SCHEMES: dict[str, Scheme] = {
    "file": Scheme(open_file_url, "file:///abs/path"),
    "": Scheme(open_path, "a plain directory path"),
    "s3": Scheme(open_s3_url, "s3://bucket/prefix"),
}
"""Backends by URL scheme; '' is a plain path (a one-letter scheme is a Windows drive letter: a path too)."""


def open_storage(url: str, endpoint_url: str | None = None) -> Storage:
    """Open the storage a URL names, by its scheme (`SCHEMES`).

    Args:
        url: ``file:///abs/dir``, a plain path (``./dir``), or ``s3://bucket/optional/prefix``.
        endpoint_url: S3 endpoint for non-AWS stores (ignored for local paths).

    Returns:
        A `LocalStorage` or an `S3Storage`.

    Raises:
        ValueError: for an unknown scheme or an s3 URL without a bucket.
    """
    scheme = urlsplit(url).scheme
    found = SCHEMES.get("" if len(scheme) == 1 else scheme)
    if found is None:
        examples = [entry.example for entry in SCHEMES.values()]
        raise ValueError(
            f"storage url {url!r} has unsupported scheme {scheme!r}: "
            f"use {', '.join(examples[:-1])}, or {examples[-1]}"
        )
    return found.open(url, endpoint_url)


def check_reachable(storage: Storage, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
    """Fail fast, with a clear message, if `storage` cannot be used (its own `check_reachable`).

    For S3: a TCP connect to the endpoint (``timeout_s``), then one HEAD of the bucket. For a local
    directory: the root exists or can be created, and is writable. A `CachingStorage` is checked
    through to its backend.

    Args:
        storage: the storage to check.
        create_bucket: create a missing S3 bucket instead of failing.
        timeout_s: TCP connect timeout in seconds.

    Raises:
        StorageUnreachableError: naming the endpoint or directory, the rule, and the fix. Never
            contains credentials.
    """
    storage.check_reachable(create_bucket, timeout_s)


def remove_temporaries(storage: Storage, prefix: str, older_than_s: float = 0.0) -> list[str]:
    """Remove what interrupted writes left under `prefix`: `LocalStorage`'s ``.tmp-*`` files (see
    `LocalStorage.remove_temporaries`). S3 leaves nothing (a PUT is atomic), so there it is a no-op.

    Returns:
        The removed paths, relative to the storage root.
    """
    if isinstance(storage, CachingStorage):
        return remove_temporaries(storage.inner, prefix, older_than_s)
    if isinstance(storage, LocalStorage):
        return storage.remove_temporaries(prefix, older_than_s)
    return []

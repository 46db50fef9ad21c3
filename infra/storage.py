"""Object storage for checkpoints and artifacts: one `Storage` interface, a local and an S3 backend.

Both backends hold opaque bytes under '/'-separated keys and behave the same way, so code above
them (checkpoints, tasks) never knows where its objects live (DESIGN.md, "Storage layout"):

* `LocalStorage` keeps each key as a file under a root directory; a write goes to a temporary
  file in the same directory and is renamed over the target (`os.replace`), so a reader sees the
  old object or the new one, never half of one. A write killed before its rename leaves a
  ``.tmp-*`` file, which listings skip and `remove_temporaries` removes.
* `S3Storage` keeps each key as an S3 object (AWS, MinIO, SeaweedFS via `endpoint_url`); an S3
  PUT is atomic per object. The bucket is created on demand at the first write. Every request
  rides through an outage of the endpoint (`infra.outage`): it waits, within the outage budget,
  and is sent again (each is idempotent: a PUT, GET, HEAD, LIST or DELETE).
* `CachingStorage` wraps either with an in-process, read-through LRU cache of immutable objects.

Stored objects are safetensors (`tensors_to_bytes`) and JSON (`put_json`), never pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import boto3
import torch
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from infra.errors import InfraError, StorageKeyError, StorageUnreachableError, redact_url
from infra.outage import configured_budget_s, ride_through

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

T = TypeVar("T")

_TMP_PREFIX = ".tmp-"
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DELETE_BATCH = 1000


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


# --------------------------------------------------------------------------- keys


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
        if segment.startswith(_TMP_PREFIX):
            raise ValueError(f"{what} {value!r}: segments starting with {_TMP_PREFIX!r} are reserved; {fix}")


def _is_not_found(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES


# --------------------------------------------------------------------------- local


class LocalStorage:
    """Objects as files under `root`; writes are atomic (temporary file + `os.replace`).

    Args:
        root: directory holding the objects; created on the first write. Made absolute.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        """``file://`` URL of the root directory."""
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` to a temporary file beside the target, fsync it, then rename it over."""
        path = self._path(key)
        for attempt in range(3):
            try:
                _atomic_write(path, data)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the (empty) parent directory between mkdir and write.
                if attempt == 2:
                    raise

    def get_bytes(self, key: str) -> bytes:
        """Return the file's bytes; raise `StorageKeyError` if there is no such object."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageKeyError(key, self.url) from None

    def exists(self, key: str) -> bool:
        """Return whether the key's file exists."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        """Return the sorted keys under `prefix`, skipping temporary files of unfinished writes."""
        validate_prefix(prefix)
        start = self.root.joinpath(*prefix.split("/")[:-1])
        return sorted(key for key in self._walk(start) if key.startswith(prefix))

    def _walk(self, start: Path) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith(_TMP_PREFIX):
                    yield name if rel == "." else f"{rel}/{name}"

    def delete(self, key: str) -> None:
        """Remove the key's file (no error if absent) and any directories left empty."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune_empty_dirs(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under `prefix` and the directories left empty."""
        for key in self.list_keys(prefix):
            self.delete(key)

    def remove_temporaries(self, prefix: str, older_than_s: float = 0.0) -> list[str]:
        """Remove the temporary files of writes that never finished (a killed process leaves its
        ``.tmp-*`` file behind) under `prefix`, and the directories left empty.

        Args:
            prefix: key prefix to clean, e.g. ``"exp/run/"``.
            older_than_s: only files last written at least this many seconds ago; 0 for all of them
                (only when no write under `prefix` can be running).

        Returns:
            The removed files' paths relative to the root, sorted.
        """
        validate_prefix(prefix)
        start = self.root.joinpath(*prefix.split("/")[:-1])
        cutoff = time.time() - older_than_s
        removed = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if name.startswith(_TMP_PREFIX) and key.startswith(prefix) and _mtime(path) <= cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(key)
        for key in removed:
            self._prune_empty_dirs((self.root / key).parent)
        return sorted(removed)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # its write finished (renamed) or another cleaner removed it
        return float("inf")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, so LATEST written after an object never survives it alone.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
) -> S3Client:
    """Build a boto3 S3 client; credentials come from boto3's usual chain unless given.

    Args:
        endpoint_url: e.g. ``http://127.0.0.1:8333`` for SeaweedFS/MinIO; None for AWS.
        region: signing region; defaults to AWS_REGION / AWS_DEFAULT_REGION, else ``us-east-1``
            when an endpoint is given.
        access_key_id: explicit key id (default: AWS_ACCESS_KEY_ID, profiles, roles ...).
        secret_access_key: explicit secret, used with `access_key_id`.
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for a response.
        max_attempts: total attempts per request, retries included ("standard" retry mode).

    Returns:
        A botocore S3 client using path-style addressing when `endpoint_url` is set.
    """
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint_url and not region:
        region = "us-east-1"
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


class S3Storage:
    """Objects in an S3 bucket under an optional key prefix; the bucket is created on demand.

    Args:
        bucket: bucket name (3-63 lowercase letters, digits, '.', '-').
        prefix: key prefix inside the bucket, e.g. ``"team/fedprune"``; '' for the bucket root.
        endpoint_url: S3 endpoint for non-AWS stores, e.g. ``http://127.0.0.1:8333``.
        region: signing region (see `make_s3_client`).
        client: a ready boto3 S3 client (tests, custom credentials); built when None.
        outage_budget_s: how long a request waits for an unreachable endpoint; None reads
            FEDPRUNE_OUTAGE_BUDGET_S (default 300 s).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
        outage_budget_s: float | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"S3 bucket {bucket!r} is not a valid name: use 3-63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit, e.g. 'fedprune'"
            )
        self.bucket = bucket
        self.prefix = validate_prefix(prefix.strip("/")).strip("/")
        self.endpoint_url = endpoint_url
        self.client: S3Client = client if client is not None else make_s3_client(endpoint_url, region)
        self.outage_budget_s = configured_budget_s() if outage_budget_s is None else outage_budget_s

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` URL of the stored objects."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={redact_url(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"S3Storage({self.url!r}{endpoint})"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ride(self, call: Callable[[], T]) -> T:
        return ride_through(f"storage {self.url}", call, self.outage_budget_s, "s3")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a concurrent creation is not an error)."""
        self._ride(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if not _is_not_found(error):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if self.endpoint_url is None and region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as error:
            if error.response["Error"].get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_bytes(self, key: str, data: bytes) -> None:
        """PUT the object (atomic in S3); creates the bucket and retries once if it is missing."""
        full = self._full(validate_key(key))
        self._ride(lambda: self._put(full, data))

    def _put(self, full: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except ClientError as error:
            if error.response["Error"].get("Code") != "NoSuchBucket":
                raise
            self._ensure_bucket()
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get_bytes(self, key: str) -> bytes:
        """GET the object; raise `StorageKeyError` if the key (or the bucket) does not exist."""
        full = self._full(validate_key(key))
        return self._ride(lambda: self._get(key, full))

    def _get(self, key: str, full: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if _is_not_found(error):
                raise StorageKeyError(key, self.url) from None
            raise
        body: bytes = response["Body"].read()  # inside the ride: the connection can drop mid-body
        return body

    def exists(self, key: str) -> bool:
        """HEAD the object."""
        full = self._full(validate_key(key))
        return self._ride(lambda: self._exists(full))

    def _exists(self, full: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if _is_not_found(error):
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """List keys under `prefix` (all pages), relative to this storage's prefix, sorted."""
        full = self._full(validate_prefix(prefix)) if prefix else (f"{self.prefix}/" if self.prefix else "")
        return self._ride(lambda: self._list(full))

    def _list(self, full: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except ClientError as error:
            if _is_not_found(error):
                return []
            raise
        return sorted(keys)

    def delete(self, key: str) -> None:
        """DELETE the object (S3 treats a missing key as success)."""
        full = self._full(validate_key(key))
        self._ride(lambda: self._delete(full))

    def _delete(self, full: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if not _is_not_found(error):
                raise

    def delete_prefix(self, prefix: str) -> None:
        """Delete all objects under `prefix` with batched DeleteObjects calls (1000 per call)."""
        keys = [self._full(key) for key in self.list_keys(prefix)]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            response = self._ride(functools.partial(self._delete_batch, batch))
            if response.get("Errors"):
                first = response["Errors"][0]
                raise InfraError(
                    f"S3 refused to delete {len(response['Errors'])} objects under {self.url}/{prefix} "
                    f"(first: {first.get('Key')!r}, {first.get('Code')}): check the credentials' "
                    "s3:DeleteObject permission and retry"
                )

    def _delete_batch(self, batch: list[dict[str, str]]) -> Any:
        return self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


# --------------------------------------------------------------------------- cache


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


# --------------------------------------------------------------------------- opening and checks


def open_storage(url: str, endpoint_url: str | None = None) -> Storage:
    """Open the storage a URL names.

    Args:
        url: ``file:///abs/dir``, a plain path (``./dir``), or ``s3://bucket/optional/prefix``.
        endpoint_url: S3 endpoint for non-AWS stores (ignored for local paths).

    Returns:
        A `LocalStorage` or an `S3Storage`.

    Raises:
        ValueError: for an unknown scheme or an s3 URL without a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage url {url!r} has no bucket: use s3://<bucket>/<optional prefix>")
        return S3Storage(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage url {url!r} names host {parts.netloc!r}: use file:///absolute/path")
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return LocalStorage(Path(url))
    raise ValueError(
        f"storage url {url!r} has unsupported scheme {parts.scheme!r}: "
        "use file:///abs/path, a plain directory path, or s3://bucket/prefix"
    )


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


def check_reachable(storage: Storage, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
    """Fail fast, with a clear message, if `storage` cannot be used.

    For S3: a TCP connect to the endpoint (``timeout_s``), then one HEAD of the bucket. For a local
    directory: the root exists or can be created, and is writable. Other backends pass.

    Args:
        storage: the storage to check (a `CachingStorage` is checked through to its backend).
        create_bucket: create a missing S3 bucket instead of failing.
        timeout_s: TCP connect timeout in seconds.

    Raises:
        StorageUnreachableError: naming the endpoint or directory, the rule, and the fix. Never
            contains credentials.
    """
    if isinstance(storage, CachingStorage):
        check_reachable(storage.inner, create_bucket, timeout_s)
    elif isinstance(storage, S3Storage):
        _check_s3(storage, create_bucket, timeout_s)
    elif isinstance(storage, LocalStorage):
        _check_local(storage)


def _check_local(storage: LocalStorage) -> None:
    try:
        storage.root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageUnreachableError(
            f"storage directory {storage.root} cannot be created ({error.strerror}): local storage needs a "
            "writable directory; set FEDPRUNE_STORAGE_URL to one you can write"
        ) from None
    if not os.access(storage.root, os.W_OK | os.X_OK):
        raise StorageUnreachableError(
            f"storage directory {storage.root} is not writable: local storage needs a writable directory; "
            "fix its permissions or set FEDPRUNE_STORAGE_URL to another directory"
        )


def _check_s3(storage: S3Storage, create_bucket: bool, timeout_s: float) -> None:
    endpoint = redact_url(storage.client.meta.endpoint_url)
    _check_tcp(endpoint, storage.client.meta.endpoint_url, timeout_s)
    try:
        storage.client.head_bucket(Bucket=storage.bucket)
    except NoCredentialsError:
        raise StorageUnreachableError(
            f"no S3 credentials found for {endpoint}: S3 storage needs credentials; export "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure an AWS profile)"
        ) from None
    except ClientError as error:
        _raise_for_bucket(storage, endpoint, error, create_bucket)
    except BotoCoreError as error:
        raise StorageUnreachableError(
            f"S3 endpoint {endpoint} did not answer ({type(error).__name__}): storage needs a reachable S3 "
            "endpoint; start the local stack or set FEDPRUNE_S3_ENDPOINT_URL to a running one"
        ) from None


def _check_tcp(endpoint: str, raw_endpoint: str, timeout_s: float) -> None:
    parts = urlsplit(raw_endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise StorageUnreachableError(
            f"S3 endpoint {endpoint} is unreachable ({reason}): storage needs a reachable S3 endpoint; "
            "start the local stack (`fedprune stack up`) or set FEDPRUNE_S3_ENDPOINT_URL to a running one"
        ) from None


def _raise_for_bucket(storage: S3Storage, endpoint: str, error: ClientError, create_bucket: bool) -> None:
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in _NOT_FOUND_CODES and create_bucket:
        storage.ensure_bucket()
        return
    if code in _NOT_FOUND_CODES:
        raise StorageUnreachableError(
            f"S3 bucket {storage.bucket!r} does not exist at {endpoint}: storage needs an existing bucket; "
            "create it (check_reachable(storage, create_bucket=True)) or fix FEDPRUNE_STORAGE_URL"
        ) from None
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        raise StorageUnreachableError(
            f"S3 endpoint {endpoint} rejected the credentials for bucket {storage.bucket!r} ({code}): "
            "export the right AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this endpoint"
        ) from None
    raise StorageUnreachableError(
        f"S3 endpoint {endpoint} answered {code} for bucket {storage.bucket!r}: check the endpoint URL, "
        "bucket name and credentials"
    ) from None


# --------------------------------------------------------------------------- tensors and JSON


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors to safetensors bytes (bool masks included).

    Tensors are moved to CPU and made contiguous; tensors sharing memory (views of one fused
    tensor) are copied, since safetensors stores each name separately.

    Args:
        tensors: name -> tensor of any shape and dtype.
        metadata: optional str -> str header entries, e.g. ``{"round": "12"}``.

    Returns:
        The safetensors file as bytes.
    """
    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"safetensors metadata values must be str, got {bad}: convert them with str()")
    return _st_save(_unshare(tensors), metadata=dict(metadata) if metadata is not None else None)


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() > 0 else t
        seen.add(ptr)
    return out


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Deserialize safetensors bytes to CPU tensors (name -> tensor)."""
    return _st_load(data)


def json_bytes(obj: Any) -> bytes:
    """Encode `obj` as stable JSON: sorted keys, 2-space indent, trailing newline, UTF-8."""
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8")


def put_json(storage: Storage, key: str, obj: Any) -> None:
    """Store `obj` as stable JSON (see `json_bytes`) under `key`."""
    storage.put_bytes(key, json_bytes(obj))


def get_json(storage: Storage, key: str) -> Any:
    """Read and decode the JSON object under `key` (`StorageKeyError` if missing)."""
    return json.loads(storage.get_bytes(key))


def sha256_hex(data: bytes) -> str:
    """Hex sha256 digest of `data`."""
    return hashlib.sha256(data).hexdigest()

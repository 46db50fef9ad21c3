"""Errors raised by `infra`: each message names the value, the rule it broke and the fix.

Messages never contain credentials; URLs are passed through `redact_url` before they are shown.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class InfraError(RuntimeError):
    """Base class of the errors `infra` raises for services and stored data."""


class StorageKeyError(KeyError):
    """No object is stored under `key`.

    Subclasses `KeyError`, so `except KeyError` catches it, but prints its message plainly.
    """

    def __init__(self, key: str, location: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.location = location

    def __str__(self) -> str:
        where = f" in {self.location}" if self.location else ""
        return f"no object at key {self.key!r}{where}: read only keys that were written (see list_keys)"


class StorageUnreachableError(InfraError):
    """An S3 endpoint or bucket cannot be used (down, missing bucket, rejected credentials)."""


class CorruptCheckpointError(InfraError):
    """A committed checkpoint object is missing, unreadable or fails its sha256 check.

    Attributes:
        reason: what is wrong, one word: "bad-manifest", "missing-object", "checksum" or "bad-latest"
            (a damaged round is set aside under a folder named after it).
    """

    def __init__(self, message: str, reason: str = "damaged") -> None:
        super().__init__(message)
        self.reason = reason


class UnrecoverableRunError(InfraError):
    """A run has committed rounds but none of them verifies: resuming it would start it over."""


class CheckpointNotFoundError(InfraError, LookupError):
    """The requested run has no committed checkpoint (or not the requested round)."""


class ClientDataError(InfraError):
    """One client's data cannot be read: that client fails, the run goes on without it."""


class TrackingUnreachableError(InfraError):
    """The MLflow tracking server does not answer."""


class ClusterError(InfraError):
    """A Dask cluster cannot be used: unreachable, refusing this client, or missing a client's worker."""


class StackError(InfraError):
    """A local stack service failed to start, answer or stop."""


def redact_url(url: str) -> str:
    """Return `url` with any user:password part replaced, safe to show in messages and logs.

    Args:
        url: any URL, e.g. ``http://user:secret@host:5000``.

    Returns:
        The URL with userinfo replaced by ``***``, e.g. ``http://***@host:5000``.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))

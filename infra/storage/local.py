"""`LocalStorage`: objects as files under a root directory, written atomically.

A write goes to a temporary file in the target's directory, is fsynced and renamed over the
target (`os.replace`), so a reader sees the old object or the new one, never half of one. A write
killed before its rename leaves a ``.tmp-*`` file, which listings skip and `remove_temporaries`
removes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from infra.errors import StorageKeyError, StorageUnreachableError
from infra.storage.protocol import TMP_PREFIX, validate_key, validate_prefix


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
                if not name.startswith(TMP_PREFIX):
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

    def check_reachable(self, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
        """Check that the root exists or can be created, and is writable.

        Args:
            create_bucket: unused (a directory is created whenever it can be).
            timeout_s: unused (nothing remote is asked).

        Raises:
            StorageUnreachableError: naming the directory, the rule, and the fix.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageUnreachableError(
                f"storage directory {self.root} cannot be created ({error.strerror}): local storage needs a "
                "writable directory; set FEDPRUNE_STORAGE_URL to one you can write"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnreachableError(
                f"storage directory {self.root} is not writable: local storage needs a writable directory; "
                "fix its permissions or set FEDPRUNE_STORAGE_URL to another directory"
            )

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
                if name.startswith(TMP_PREFIX) and key.startswith(prefix) and _mtime(path) <= cutoff:
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


def open_file_url(url: str, endpoint_url: str | None = None) -> LocalStorage:
    """`LocalStorage` of a ``file:///abs/dir`` URL (`endpoint_url` is ignored).

    Raises:
        ValueError: the URL names a host other than localhost.
    """
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"storage url {url!r} names host {parts.netloc!r}: use file:///absolute/path")
    return LocalStorage(Path(unquote(parts.path)))


def open_path(url: str, endpoint_url: str | None = None) -> LocalStorage:
    """`LocalStorage` of a plain directory path such as ``./dir`` (`endpoint_url` is ignored)."""
    return LocalStorage(Path(url))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # its write finished (renamed) or another cleaner removed it
        return float("inf")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
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

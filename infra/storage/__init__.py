"""Object storage for checkpoints and artifacts: one `Storage` interface, a module per backend.

Every backend holds opaque bytes under '/'-separated keys and behaves the same way, so code above
it (checkpoints, tasks) never knows where its objects live (DESIGN.md, "Storage layout"):

* `protocol`: the `Storage` protocol and the rules for keys (`validate_key`, `validate_prefix`).
* `local`: `LocalStorage`, files under a root directory, written atomically (temporary file +
  rename); `remove_temporaries` removes what a killed write left.
* `s3`: `S3Storage` (AWS, MinIO, SeaweedFS via `endpoint_url`), riding through endpoint outages.
* `cache`: `CachingStorage`, an in-process read-through LRU cache in front of either.
* `backends`: `open_storage` (the backend by URL scheme, from `SCHEMES`), `check_reachable`.
* `serialization`: safetensors and stable JSON, never pickle; sha256 digests.

Each backend checks its own reachability (`Storage.check_reachable`). Everything is importable
from here: ``from infra.storage import open_storage, put_json``.
"""

from infra.storage.backends import SCHEMES, Scheme, check_reachable, open_storage, remove_temporaries
from infra.storage.cache import CachingStorage
from infra.storage.local import LocalStorage
from infra.storage.protocol import Storage, validate_key, validate_prefix
from infra.storage.s3 import S3Storage, make_s3_client
from infra.storage.serialization import get_json, json_bytes, put_json, sha256_hex, tensors_from_bytes, tensors_to_bytes

__all__ = [
    "SCHEMES",
    "CachingStorage",
    "LocalStorage",
    "S3Storage",
    "Scheme",
    "Storage",
    "check_reachable",
    "get_json",
    "json_bytes",
    "make_s3_client",
    "open_storage",
    "put_json",
    "remove_temporaries",
    "sha256_hex",
    "tensors_from_bytes",
    "tensors_to_bytes",
    "validate_key",
    "validate_prefix",
]

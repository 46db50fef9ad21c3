"""What FedPrune stores: tensors as safetensors, records as stable JSON, and their sha256 digests.

Stored objects are safetensors (`tensors_to_bytes`) and JSON (`put_json`), never pickle.
torch is imported when a tensor is first (de)serialized, so code that reads only JSON records
(`fedprune runs list`) starts without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from infra.storage.protocol import Storage

if TYPE_CHECKING:
    import torch


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
    from safetensors.torch import save

    return save(_unshare(tensors), metadata=dict(metadata) if metadata is not None else None)


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
    from safetensors.torch import load

    return load(data)


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

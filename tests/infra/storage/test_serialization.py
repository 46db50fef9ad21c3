"""Safetensors and stable JSON: through every backend, and tensors that share or lack storage."""

from __future__ import annotations

import pytest
import torch

from infra.storage import Storage, get_json, put_json, tensors_from_bytes, tensors_to_bytes


def test_json_helpers_write_stable_sorted_json(store: Storage) -> None:
    put_json(store, "c.json", {"b": 1, "a": {"d": [1, 2], "c": None}})
    assert get_json(store, "c.json") == {"a": {"c": None, "d": [1, 2]}, "b": 1}
    assert (
        store.get_bytes("c.json")
        == b'{\n  "a": {\n    "c": null,\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    )


def test_safetensors_objects_roundtrip_through_storage(store: Storage) -> None:
    tensors = {"w": torch.randn(3, 4), "mask": torch.tensor([[True, False], [False, True]])}
    store.put_bytes("t.safetensors", tensors_to_bytes(tensors, {"round": "3"}))
    loaded = tensors_from_bytes(store.get_bytes("t.safetensors"))
    assert loaded.keys() == tensors.keys()
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["mask"].dtype == torch.bool
    assert torch.equal(loaded["mask"], tensors["mask"])


def test_tensors_to_bytes_handles_views_non_contiguous_and_empty() -> None:
    fused = torch.arange(12.0).reshape(6, 2)  # e.g. a fused q/k/v projection
    q, k, v = fused.split(2)
    tensors = {
        "q": q,
        "k": k,
        "v": v,
        "t": fused.t(),
        "e": torch.empty(0, 3),
        "i": torch.tensor([7], dtype=torch.int64),
    }
    loaded = tensors_from_bytes(tensors_to_bytes(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert tensors_from_bytes(tensors_to_bytes({})) == {}


def test_tensor_metadata_must_be_strings() -> None:
    with pytest.raises(ValueError, match="must be str"):
        tensors_to_bytes({"a": torch.zeros(1)}, {"round": 3})  # type: ignore[dict-item]

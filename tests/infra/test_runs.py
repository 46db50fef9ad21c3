"""Work objects: the in-memory scratch of the thread task runner behaves like stored objects."""

from __future__ import annotations

import pytest
import torch

from infra.errors import StorageKeyError
from infra.runs import SplitScratch, StoredScratch, TensorScratch
from infra.storage import LocalStorage


@pytest.fixture(params=["memory", "stored", "split"])
def scratch(request: pytest.FixtureRequest, tmp_path) -> TensorScratch | StoredScratch | SplitScratch:
    kinds = {"memory": TensorScratch, "stored": lambda: StoredScratch(LocalStorage(tmp_path)),
             "split": lambda: SplitScratch(LocalStorage(tmp_path))}
    return kinds[request.param]()


def test_an_object_reads_back_equal_whatever_its_producer_or_reader_does_in_place(scratch) -> None:
    produced = {"w": torch.arange(6.0).reshape(2, 3), "mask": torch.tensor([True, False])}
    scratch.put("exp/run/work/000001/masks.safetensors", produced)
    produced["w"].zero_()  # the producer changes its tensor after storing it
    first = scratch.get("exp/run/work/000001/masks.safetensors")
    first["w"].add_(100)  # a reader changes what it got
    second = scratch.get("exp/run/work/000001/masks.safetensors")
    assert torch.equal(second["w"], torch.arange(6.0).reshape(2, 3))
    assert second["mask"].dtype == torch.bool and second["mask"].tolist() == [True, False]


def test_a_missing_object_raises_storage_key_error_naming_the_key(scratch) -> None:
    with pytest.raises(StorageKeyError, match="000002/scores"):
        scratch.get("exp/run/work/000002/scores.safetensors")


def test_delete_prefix_drops_only_the_objects_under_it(scratch) -> None:
    scratch.put("exp/run/work/000001/a.safetensors", {"x": torch.ones(1)})
    scratch.put("exp/other/work/000001/a.safetensors", {"x": torch.ones(1)})
    scratch.delete_prefix("exp/run/work/")
    with pytest.raises(StorageKeyError):
        scratch.get("exp/run/work/000001/a.safetensors")
    assert torch.equal(scratch.get("exp/other/work/000001/a.safetensors")["x"], torch.ones(1))


def test_split_scratch_stores_only_what_crosses_and_counts_its_bytes(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    scratch = SplitScratch(storage)
    tensors = {"w": torch.ones(4)}
    for name in ("payload-000003", "update-000003", "state", "masks"):
        scratch.put(f"exp/run/work/000001/{name}.safetensors", tensors)
    stored = storage.list_keys("exp/run/work/")
    assert stored == ["exp/run/work/000001/payload-000003.safetensors", "exp/run/work/000001/update-000003.safetensors"]
    assert scratch.moved_bytes(stored[0]) == len(storage.get_bytes(stored[0]))
    assert scratch.moved_bytes(stored[0]) == 0  # asked once
    assert scratch.moved_bytes("exp/run/work/000001/state.safetensors") == 0
    assert torch.equal(scratch.get("exp/run/work/000001/state.safetensors")["w"], tensors["w"])

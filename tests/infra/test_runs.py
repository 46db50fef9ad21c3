"""Work objects: the in-memory scratch of the thread task runner behaves like stored objects."""

from __future__ import annotations

import pytest
import torch

from infra.errors import StorageKeyError
from infra.runs import StoredScratch, TensorScratch
from infra.storage import LocalStorage


@pytest.fixture(params=["memory", "stored"])
def scratch(request: pytest.FixtureRequest, tmp_path) -> TensorScratch | StoredScratch:
    return TensorScratch() if request.param == "memory" else StoredScratch(LocalStorage(tmp_path))


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

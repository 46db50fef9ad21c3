"""The workload registry of `infra.workloads`: every model-dependent answer comes from one entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedprune_core.presets import preset
from fedprune_core.speech.corpus import CORPUS_PRESETS
from fedprune_core.toy import ToyWorkload
from flows.validation import check_request
from infra.errors import ClientDataError
from infra.workloads import (
    TOY_CLIENTS,
    WORKLOADS,
    LazyClients,
    WorkloadData,
    WorkloadSpec,
    corpus_config,
    load,
    models,
    num_clients,
    prepare_worker,
    worker_clients,
    workload_spec,
)

TALLY_CLIENTS = 3


class Tally:
    """A throwaway workload entry that records what the registry asks of it."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str, int, Path, tuple[int, ...] | None]] = []
        self.read: list[str] = []
        self.prepared: list[tuple[str, Path, tuple[int, ...]]] = []

    def load(self, model: str, corpus: str, seed: int, data_dir: Path, held: tuple[int, ...] | None) -> WorkloadData:
        self.loads.append((model, corpus, seed, data_dir, held))
        names = [f"c{i}" for i in range(TALLY_CLIENTS)]
        clients = LazyClients(names, lambda name: self.read.append(name) or [name], held)
        return WorkloadData(ToyWorkload(), clients, ["held-out"])

    def prepare(self, corpus: str, data_dir: Path, held: tuple[int, ...]) -> Path:
        self.prepared.append((corpus, data_dir, held))
        return data_dir / corpus

    def spec(self) -> WorkloadSpec:
        return WorkloadSpec("tally", ("tally-a", "tally-b"), lambda corpus: TALLY_CLIENTS, self.load,
                            {"tally-corpus": CORPUS_PRESETS["test"]}, self.prepare)


@pytest.fixture
def tally(monkeypatch: pytest.MonkeyPatch) -> Tally:
    """`Tally` registered for the test (and removed after it)."""
    entry = Tally()
    monkeypatch.setitem(WORKLOADS, "tally", entry.spec())
    return entry


def test_the_registry_serves_each_model_from_one_entry() -> None:
    assert models() == ("toy", "noop", "tiny", "demo", "small", "paper")
    assert {m: workload_spec(m).name for m in models()} == {
        "toy": "toy", "noop": "noop", "tiny": "speech", "demo": "speech", "small": "speech", "paper": "speech"}
    assert num_clients(preset("toy")) == TOY_CLIENTS
    assert num_clients(preset("tiny")) == CORPUS_PRESETS["test"].num_clients
    assert num_clients(preset("small")) == CORPUS_PRESETS["bench"].num_clients
    assert corpus_config("bench") is CORPUS_PRESETS["bench"]


def test_a_registered_workload_is_counted_loaded_and_prepared_by_its_model(tally: Tally, tmp_path: Path) -> None:
    config = preset("toy", {"model": "tally-a", "corpus": "tally-corpus"})
    assert num_clients(config) == TALLY_CLIENTS
    assert "tally-b" in models() and workload_spec("tally-b").name == "tally"
    assert check_request("toy", {"model": "tally-a"}, None, "fedprune") == preset("toy", {"model": "tally-a"})
    with pytest.raises(ValueError, match="clients_per_round=4 exceeds the 3 clients"):
        check_request("toy", {"model": "tally-a", "federated": {"clients_per_round": 4}}, None, "fedprune")

    data = load("tally-b", "tally-corpus", 7, str(tmp_path), "0,2")
    assert tally.loads == [("tally-b", "tally-corpus", 7, tmp_path, (0, 2))]
    assert data.clients[2] == ["c2"] and list(data.eval_examples) == ["held-out"]
    with pytest.raises(ClientDataError, match=r"client 1 \(c1\): this process holds no data of it"):
        data.clients[1]
    assert tally.read == ["c2"]
    assert load("tally-b", "tally-corpus", 7, str(tmp_path), "0,2") is data  # loaded once per process
    assert load("tally-a", "tally-corpus", 7, str(tmp_path)).clients[1] == ["c1"]  # "all": held None
    assert tally.loads[-1][-1] is None

    assert worker_clients("tally-corpus", "1-2") == (1, 2)
    assert prepare_worker("tally-corpus", tmp_path, (1, 2)) == tmp_path / "tally-corpus"
    assert tally.prepared == [("tally-corpus", tmp_path, (1, 2))]
    with pytest.raises(ValueError, match=r"clients='0-3' names 3, but the data has clients 0-2"):
        worker_clients("tally-corpus", "0-3")


def test_an_unknown_model_names_itself_and_the_registered_ones() -> None:
    shown = (r"model='nope' is not served by a registered workload: use one of toy, noop, tiny, demo, small, paper, "
             "or add")
    with pytest.raises(ValueError, match=shown):
        num_clients(preset("tiny", {"model": "nope"}))
    with pytest.raises(ValueError, match=shown):
        load("nope", "test", 0, "unused")
    with pytest.raises(ValueError, match=shown):
        check_request("tiny", {"model": "nope"}, None, "fedprune")


def test_a_worker_without_a_corpus_stands_for_seed_made_clients(tmp_path: Path) -> None:
    assert worker_clients(None, "all") == tuple(range(TOY_CLIENTS))
    assert worker_clients("test", "all") == tuple(range(CORPUS_PRESETS["test"].num_clients))
    assert prepare_worker(None, tmp_path, (0, 1)) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=rf"names {TOY_CLIENTS}, but the data has clients 0-{TOY_CLIENTS - 1}"):
        worker_clients(None, str(TOY_CLIENTS))
    with pytest.raises(ValueError, match=r"corpus=.nope. is not a corpus preset: use one of test, digits, bench"):
        worker_clients("nope", "0")


def test_a_toy_corpus_names_its_client_count_and_client_data_does_not_depend_on_it() -> None:
    assert num_clients(preset("toy", {"corpus": "toy-128"})) == 128
    few, many = load("toy", "toy", 3, "unused"), load("toy", "toy-32", 3, "unused")
    assert len(many.clients) == 32
    assert all(torch.equal(a[0], b[0]) for a, b in zip(few.clients[7], many.clients[7], strict=True))
    for corpus in ("toy-0", "toy-x", "test"):
        with pytest.raises(ValueError, match=rf"corpus='{corpus}' is not a toy corpus: .* toy-N for N clients"):
            num_clients(preset("toy", {"corpus": corpus}))

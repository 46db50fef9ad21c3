"""Client lists, worker resources, scheduler addresses and TLS settings of `infra.cluster`."""

from __future__ import annotations

import pytest

from fedprune_core.engine import ClientStats
from infra.cluster import (
    Placement,
    check_address,
    check_served,
    clients_of,
    format_clients,
    parse_clients,
    placement_csv,
    placement_row,
    resources_arg,
    security_for,
)
from infra.errors import ClientDataError, ClusterError
from infra.runs import RunOptions
from infra.workloads import LazyClients


@pytest.mark.parametrize(("spec", "expected"), [
    ("0-3,7", (0, 1, 2, 3, 7)), ("7, 0-1 ,1", (0, 1, 7)), ("all", tuple(range(10))), ("none", ()), ("5", (5,)),
])
def test_a_client_spec_names_its_ids_and_formats_back(spec: str, expected: tuple[int, ...]) -> None:
    assert parse_clients(spec, 10) == expected
    assert parse_clients(format_clients(expected), 10) == expected


def test_format_clients_writes_runs() -> None:
    assert format_clients([9, 0, 1, 2, 5, 6]) == "0-2,5-6,9"
    assert format_clients([]) == "none"


@pytest.mark.parametrize(("spec", "message"), [
    ("0-x", r"clients='0-x' is not a client list: use e.g. 0-15,32, all or none"),
    ("3-1", r"range '3-1' runs backwards: write it 1-3"),
    ("2,8-11", r"names 10-11, but the data has clients 0-9"),
])
def test_a_bad_client_spec_is_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_clients(spec, 10)


def test_worker_resources_declare_clients_and_nothing_else() -> None:
    assert resources_arg([0, 2]) == "client-0=1 client-2=1"
    assert clients_of({"client-0": 1, "client-2": 1.0, "GPU": 2, "client-x": 1, "client-5": 0}) == (0, 2)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "127.0.0.1:8786", "tcp://localhost:1", "tcp://[::1]:5",
                                     "tls://10.0.0.5:8786", "tls://scheduler.example.org:8786"])
def test_loopback_tcp_and_any_tls_address_are_accepted(address: str) -> None:
    assert check_address(address).split("://")[1] == address.split("://")[-1]


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "10.0.0.5:8786", "tcp://scheduler.example.org:8786"])
def test_plain_tcp_off_loopback_is_refused_unless_insecure(address: str) -> None:
    with pytest.raises(ValueError, match="is plain TCP to a non-loopback host: .* Use tls:// .* or pass --insecure"):
        check_address(address)
    assert check_address(address, insecure=True).startswith("tcp://")
    with pytest.raises(ValueError, match="plain TCP"):
        RunOptions(task_runner="dask", dask_address=address)


def test_other_schemes_and_an_address_without_dask_are_refused() -> None:
    with pytest.raises(ValueError, match="has scheme 'ucx'"):
        check_address("ucx://10.0.0.5:8786")
    with pytest.raises(ValueError, match="needs task_runner='dask', not 'threads'"):
        RunOptions(dask_address="tcp://127.0.0.1:8786")


def test_tls_without_dask_tls_settings_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        with pytest.raises(ClusterError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE.*fedprune cluster certs DIR"):
            security_for("tls://127.0.0.1:8786")
    assert security_for("tcp://127.0.0.1:8786") is None


def test_check_served_names_the_clients_without_a_worker() -> None:
    check_served({0: ["w0"], 1: ["w0"], 2: ["w1"]}, 3, "tcp://127.0.0.1:1")
    missing = r"serves clients 1,3-4 \(of 0-4\): start `fedprune worker .* --clients 1,3-4`"
    with pytest.raises(ClusterError, match=missing):
        check_served({0: ["w0"], 1: [], 2: ["w1"]}, 5, "tcp://127.0.0.1:1")


def test_a_process_that_does_not_hold_a_client_says_so_without_reading() -> None:
    read: list[str] = []
    clients = LazyClients(["a", "b", "c"], lambda name: read.append(name) or [name], held=[0, 2])
    assert len(clients) == 3 and clients[2] == ["c"]
    with pytest.raises(ClientDataError, match=
                       r"client 1 \(b\): this process holds no data of it \(it holds clients 0,2\)"):
        clients[1]
    assert read == ["c"]


def test_a_placement_row_takes_the_client_and_its_bytes_from_the_task_result() -> None:
    stats = ClientStats(client_id=3, num_examples=10, mean_loss=0.5, wall_time_s=1.0, peak_memory_bytes=99,
                        bytes_down=5, bytes_up=4, params_down=3)
    row = placement_row(2, stats, Placement("w0", bytes_read=9, bytes_written=8))
    assert row == {"round": 2, "client": 3, "worker": "w0", "bytes_read": 9, "bytes_written": 8, "bytes_down": 5,
                   "bytes_up": 4}
    assert placement_csv([row]).splitlines()[1] == "2,3,w0,9,8,5,4"


def test_placement_csv_is_in_round_and_client_order() -> None:
    rows = [{"round": 2, "client": 0, "worker": "w0", "bytes_read": 9, "bytes_written": 8, "bytes_down": 5,
             "bytes_up": 4},
            {"round": 1, "client": 3, "worker": "w2", "bytes_read": 7, "bytes_written": 6, "bytes_down": 3,
             "bytes_up": 2}]
    assert placement_csv(rows) == ("round,client,worker,bytes_read,bytes_written,bytes_down,bytes_up\n"
                                   "1,3,w2,7,6,3,2\n2,0,w0,9,8,5,4\n")

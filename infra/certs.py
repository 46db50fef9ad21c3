"""A certificate authority and TLS certificates for a FedPrune Dask cluster (mutual TLS).

Dask's TLS (``tls://``) authenticates both ends of every connection against one CA: the scheduler,
each worker and each client (the flow) show a certificate the cluster's CA signed, and a party
without one cannot join. `make_certificates` writes, into one directory::

    ca.pem, ca-key.pem                  the cluster's CA (keep ca-key.pem away from the cluster)
    scheduler.pem, scheduler-key.pem    for `dask scheduler`
    worker.pem, worker-key.pem          for `fedprune worker`
    client.pem, client-key.pem          for `fedprune run` (the flow's Dask client)
    scheduler.env, worker.env, client.env   Dask's own TLS settings for each role, to `source`

Keys are ECDSA P-256, readable by their owner only. Hostnames are not checked (Dask expects a
dedicated CA and IP addresses), so the names in the certificates are informative.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("scheduler", "worker", "client")
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class CertificateFiles:
    """Where one role's files are."""

    cert: Path
    key: Path
    env: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedPrune cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("FedPrune cluster CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(role: str, hosts: list[str], ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
          now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (x509.CertificateBuilder().subject_name(_name(f"fedprune-{role}")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=False)
            .add_extension(_san(hosts), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def role_env(role: str, ca_file: Path, cert: Path, key: Path) -> str:
    """Dask's TLS settings for `role` as shell exports (Dask reads them as its configuration)."""
    prefix = f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}"
    return (f"export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True\n"
            f"export DASK_DISTRIBUTED__COMM__TLS__CA_FILE={ca_file}\n"
            f"export {prefix}__CERT={cert}\nexport {prefix}__KEY={key}\n")


def make_certificates(directory: Path, hosts: list[str] | None = None) -> dict[str, CertificateFiles]:
    """Write a new CA, a certificate for each role, and each role's env file into `directory`.

    Args:
        directory: created if missing; existing files of these names are replaced.
        hosts: names and IPs written into the certificates (default: localhost, 127.0.0.1).

    Returns:
        Role -> its certificate, key and env file.
    """
    directory = directory.expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    hosts = hosts or ["localhost", "127.0.0.1"]
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    ca_key, ca = _ca(now)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca-key.pem", ca_key)
    files = {}
    for role in ROLES:
        key, cert = _leaf(role, hosts, ca_key, ca, now)
        paths = CertificateFiles(directory / f"{role}.pem", directory / f"{role}-key.pem", directory / f"{role}.env")
        paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(paths.key, key)
        paths.env.write_text(role_env(role, ca_file, paths.cert, paths.key))
        files[role] = paths
    return files


def env_of(path: Path) -> dict[str, str]:
    """The variables an env file `make_certificates` wrote exports."""
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs}

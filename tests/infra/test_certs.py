"""The cluster's CA and role certificates: signed by that CA only, private keys private, env files Dask reads."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import dask
import pytest
from cryptography import x509
from distributed.security import Security

from infra.certs import ROLES, env_of, make_certificates


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_each_role_is_signed_by_the_cluster_ca_and_no_other(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "ours", ["10.0.0.5", "scheduler.example.org"])
    other = make_certificates(tmp_path / "other")
    ca = _cert(tmp_path / "ours" / "ca.pem")
    for role in ROLES:
        cert = _cert(files[role].cert)
        cert.verify_directly_issued_by(ca)
        with pytest.raises(Exception):  # noqa: B017 - cryptography raises InvalidSignature or ValueError
            _cert(other[role].cert).verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["scheduler.example.org"]
        assert stat.S_IMODE(files[role].key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ours" / "ca-key.pem").stat().st_mode) == 0o600


def test_the_env_files_are_dask_tls_settings_that_load(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    for role in ROLES:
        env = env_of(files[role].env)
        prefix = f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}"
        assert env == {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
                       "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tmp_path / "ca.pem"),
                       f"{prefix}__CERT": str(files[role].cert), f"{prefix}__KEY": str(files[role].key)}
        config = {"distributed.comm.tls.ca-file": str(tmp_path / "ca.pem"),
                  f"distributed.comm.tls.{role}.cert": str(files[role].cert),
                  f"distributed.comm.tls.{role}.key": str(files[role].key)}
        with dask.config.set(config):
            context = Security(require_encryption=True).get_connection_args(role)["ssl_context"]
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED

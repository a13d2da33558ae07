"""TLS to a real registry: verified by default, trusted through ca_file, and off only when asked."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from georeg.config import RegistryConfig, ReplicationConfig
from georeg.errors import PermanentRegistryError
from georeg.registry import RegistryClient
from georeg.registry.auth import PULL_ONLY
from tests.support.registry import RegistryProcess


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(directory)
    extra = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with RegistryProcess(directory / "registry", extra_config=extra) as registry:
        yield registry.url, cert


def client(url: str, **tls: object) -> RegistryClient:
    config = RegistryConfig.model_validate({"url": url, **tls})
    return RegistryClient("primary", config, ReplicationConfig(request_attempts=3), allowed_actions=PULL_ONLY)


async def test_verification_is_on_by_default_and_fails_fast_saying_what_to_do(tls_registry):
    url, _ = tls_registry
    async with client(url) as untrusting:
        with pytest.raises(PermanentRegistryError, match=r"TLS verification of 127\.0\.0\.1 failed .*set ca_file"):
            await untrusting.ping()
        assert untrusting.stats.requests["GET"] == 1  # a certificate problem is not retried


async def test_ca_file_makes_the_registry_trusted(tls_registry):
    url, cert = tls_registry
    async with client(url, ca_file=str(cert)) as trusting:
        await trusting.ping()


async def test_insecure_turns_verification_off(tls_registry):
    url, _ = tls_registry
    async with client(url, insecure=True) as careless:
        await careless.ping()


def test_clients_share_one_tls_context_per_ca_bundle_and_a_replaced_bundle_is_read_again(tmp_path: Path):
    from georeg.registry.tls import tls_verification as _tls_verification

    # Building a context parses the whole CA bundle (about 0.1 s): once per process, not per client.
    default = RegistryConfig(url="http://127.0.0.1:5000")
    assert _tls_verification(default) is _tls_verification(RegistryConfig(url="https://registry.example"))
    assert _tls_verification(RegistryConfig(url="http://127.0.0.1:5000", insecure=True)) is False

    first, _ = self_signed(tmp_path)
    trusting = RegistryConfig(url="https://127.0.0.1:5000", ca_file=str(first))
    context = _tls_verification(trusting)
    assert context is _tls_verification(trusting)
    assert context is not _tls_verification(default)

    (tmp_path / "new").mkdir()
    replacement, _ = self_signed(tmp_path / "new")
    first.write_bytes(replacement.read_bytes() + b"\n")  # rotated in place: same path, new content
    assert _tls_verification(trusting) is not context

"""TLS to a real registry: verified by default, trusted through ca_file, and off only when asked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from georeg.config import RegistryConfig, ReplicationConfig
from georeg.errors import PermanentRegistryError
from georeg.registry import RegistryClient
from georeg.registry.auth import PULL_ONLY
from tests.support.certificates import write_self_signed
from tests.support.registry import RegistryProcess


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and its key, in `directory`."""
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    write_self_signed(cert_path, key_path, common_name="127.0.0.1", server_ip="127.0.0.1")
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

"""TLS for registries and the Prefect API: one context per CA bundle and process, and telling a
certificate failure from other connection failures."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import httpx

from georeg.config import RegistryConfig


def is_certificate_error(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def default_tls_context() -> ssl.SSLContext:
    """The TLS context of registries without a ca_file (the system's CAs), built once per process.
    A warm engine builds it before it forks, so that the flow runs it starts inherit it."""
    return _tls_context(None, None)


def ca_bundle_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """The TLS context that trusts `ca_file` (the system's CAs when None), built once per bundle and process."""
    if ca_file is None:
        return default_tls_context()
    try:
        stat = Path(ca_file).stat()
        version = (stat.st_mtime_ns, stat.st_size)  # a replaced bundle gets a context of its own
    except OSError:
        version = None  # let ssl report the missing file
    return _tls_context(str(ca_file), version)


def tls_verification(config: RegistryConfig) -> ssl.SSLContext | bool:
    return False if config.insecure else ca_bundle_context(config.ca_file)


@functools.lru_cache(maxsize=16)
def _tls_context(ca_file: str | None, version: tuple[int, int] | None) -> ssl.SSLContext:
    """One TLS context per CA bundle and process, shared by every client (an SSLContext is safe to share).

    Building one loads the whole CA bundle, about 0.1 s: httpx would do it for every client, even one
    that only speaks plain HTTP (a blob GET may still redirect to https storage), which put 0.2 s of
    certificate parsing at the start of every replication.
    """
    if ca_file is not None:
        return ssl.create_default_context(cafile=ca_file)
    return httpx.create_ssl_context()

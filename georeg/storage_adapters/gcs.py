"""The registry's `gcs` driver: a Google Cloud Storage bucket.

Object names are `<rootdirectory>/<path>` with the root's slashes trimmed. Like the registry's own
client, this one honours `STORAGE_EMULATOR_HOST` (read when the adapter is made, so its location and
its client agree): the endpoint becomes the emulator and requests go unauthenticated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from georeg.errors import ConfigError
from georeg.storage_adapters.base import listed_md5
from georeg.storage_adapters.object_store import ObjectStoreAdapter
from georeg.storage_adapters.params import DriverParameters, normalise_endpoint

PARAMETERS = {"bucket", "chunksize", "credentials", "keyfile", "maxconcurrency", "rootdirectory", "useragent"}
DEFAULT_ENDPOINT = "storage.googleapis.com"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TIMEOUT_S = 30.0


class GcsAdapter(ObjectStoreAdapter):
    """Reads objects with google-cloud-storage using the keyfile, inline credentials or default credentials."""

    backend = "gcs"
    known_parameters = PARAMETERS

    def _configure(self, params: DriverParameters) -> str:
        # Parsed now (no network) so a broken key is a config error, not a failure at the first read.
        self._credentials = _service_account(params)
        self._emulator = os.environ.get(EMULATOR_ENV) or None
        if not self._emulator:
            return DEFAULT_ENDPOINT
        if "://" not in self._emulator:
            self._emulator = f"http://{self._emulator}"
        return normalise_endpoint(self._emulator, EMULATOR_ENV)

    def _make_client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        if self._emulator:
            return storage.Client(
                project=None, credentials=AnonymousCredentials(), client_options={"api_endpoint": self._emulator}
            )
        if self._credentials is not None:
            return storage.Client(project=self._credentials.project_id, credentials=self._credentials)
        return storage.Client()  # application default credentials, as the driver's fallback

    def _size(self, client: Any, key: str) -> int | None:
        blob = client.bucket(self.bucket).get_blob(key, timeout=TIMEOUT_S, retry=_retry())
        return None if blob is None or blob.size is None else int(blob.size)

    def _read(self, client: Any, key: str) -> bytes:
        return client.bucket(self.bucket).blob(key).download_as_bytes(timeout=TIMEOUT_S, retry=_retry())

    def _list(self, client: Any, prefix: str) -> Iterator[tuple[str, int, str | None]]:
        for blob in client.list_blobs(
            self.bucket, prefix=prefix, page_size=self.list_page, timeout=TIMEOUT_S, retry=_retry()
        ):
            yield blob.name, int(blob.size or 0), listed_md5(blob.md5_hash, base64=True)  # composed: none

    def _is_absent(self, error: Exception) -> bool:
        from google.api_core.exceptions import NotFound

        return isinstance(error, NotFound)

    def _service_answer(self, error: Exception) -> tuple[int | None, str | None] | None:
        from google.api_core.exceptions import GoogleAPICallError

        if not isinstance(error, GoogleAPICallError):
            return None
        return error.code, type(error).__name__  # the class names the status (Forbidden, TooManyRequests)

    def _no_answer(self, error: Exception) -> str | None:
        from google.auth.exceptions import GoogleAuthError
        from requests.exceptions import RequestException

        return type(error).__name__ if isinstance(error, (GoogleAuthError, RequestException)) else None


def _retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(TIMEOUT_S)


def _service_account(params: DriverParameters) -> Any:
    """Service-account credentials from `keyfile` (a JSON key file) or `credentials` (the same, inline)."""
    from google.oauth2 import service_account

    keyfile = params.string("keyfile")
    inline = params.mapping("credentials")
    if keyfile and inline:
        raise ConfigError(f"{params.key('credentials')}: give either keyfile or credentials, not both")
    try:
        if keyfile:
            if not Path(keyfile).is_file():
                raise ConfigError(f"{params.key('keyfile')}: no such file {keyfile}")
            return service_account.Credentials.from_service_account_file(keyfile)
        if inline:
            return service_account.Credentials.from_service_account_info(inline)
    except (ValueError, KeyError, TypeError):
        # The parser's message may quote the key material: name the parameter only.
        name = "keyfile" if keyfile else "credentials"
        raise ConfigError(f"{params.key(name)}: not a valid service account key") from None
    return None

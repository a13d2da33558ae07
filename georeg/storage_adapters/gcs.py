"""The registry's `gcs` driver: a Google Cloud Storage bucket.

Object names are `<rootdirectory>/<path>` with the root's slashes trimmed. Like the registry's own
client, this one honours `STORAGE_EMULATOR_HOST` (read when the adapter is made, so its location and
its client agree): the endpoint becomes the emulator and requests go unauthenticated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from georeg.errors import ConfigError
from georeg.storage_adapters.base import CLIENT_LOCK, StorageError, StorageLocation, backend_failure
from georeg.storage_adapters.params import (
    DriverParameters,
    directory_key,
    location_root,
    normalise_endpoint,
    normalise_root,
    object_key,
    relative_path,
)

PARAMETERS = {"bucket", "chunksize", "credentials", "keyfile", "maxconcurrency", "rootdirectory", "useragent"}
DEFAULT_ENDPOINT = "storage.googleapis.com"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TIMEOUT_S = 30.0


class GcsAdapter:
    """Reads objects with google-cloud-storage using the keyfile, inline credentials or default credentials."""

    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("gcs", parameters, PARAMETERS)
        self.bucket = params.required("bucket")
        self.root = normalise_root(params.string("rootdirectory"))
        self._emulator = os.environ.get(EMULATOR_ENV) or None
        if self._emulator:
            emulator = self._emulator if "://" in self._emulator else f"http://{self._emulator}"
            self._emulator = emulator
            self.endpoint = normalise_endpoint(emulator, EMULATOR_ENV)
        else:
            self.endpoint = DEFAULT_ENDPOINT
        # Parsed now (no network) so a broken key is a config error, not a failure at the first read.
        self._credentials = _service_account(params)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"GcsAdapter(endpoint={self.endpoint!r}, bucket={self.bucket!r}, root={location_root(self.root)!r})"

    def location(self) -> StorageLocation:
        return StorageLocation("gcs", self.endpoint, self.bucket, location_root(self.root))

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        with CLIENT_LOCK:  # made once, though the first calls may come from several threads at once
            return self._make_client()

    def _make_client(self) -> Any:
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            if self._emulator:
                self._client = storage.Client(
                    project=None, credentials=AnonymousCredentials(), client_options={"api_endpoint": self._emulator}
                )
            elif self._credentials is not None:
                self._client = storage.Client(project=self._credentials.project_id, credentials=self._credentials)
            else:
                self._client = storage.Client()  # application default credentials, as the driver's fallback
        return self._client

    def key(self, path: str) -> str:
        return object_key(self.root, path)

    def object_size(self, path: str) -> int | None:
        key = self.key(path)
        blob = self._call("HEAD", key, lambda bucket: bucket.get_blob(key, timeout=TIMEOUT_S, retry=_retry()))
        return None if blob is None or blob.size is None else int(blob.size)

    def read_small(self, path: str) -> bytes | None:
        key = self.key(path)
        return self._call(
            "GET", key, lambda bucket: bucket.blob(key).download_as_bytes(timeout=TIMEOUT_S, retry=_retry())
        )

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        prefix = directory_key(self.root, directory)
        with self._failures("LIST", prefix):
            for blob in self.client().list_blobs(
                self.bucket, prefix=prefix, page_size=self.list_page, timeout=TIMEOUT_S, retry=_retry()
            ):
                yield relative_path(self.root, blob.name), int(blob.size or 0)

    def _call(self, operation: str, key: str, action: Any) -> Any:
        from google.api_core.exceptions import NotFound

        with self._failures(operation, key):
            try:
                return action(self.client().bucket(self.bucket))
            except NotFound:
                return None

    @contextlib.contextmanager
    def _failures(self, operation: str, key: str) -> Iterator[None]:
        """The client's errors as StorageErrors that name the call and the object."""
        from google.api_core.exceptions import GoogleAPICallError
        from google.auth.exceptions import GoogleAuthError
        from requests.exceptions import RequestException

        where = f"{self.bucket}/{key}"
        try:
            yield
        except GoogleAPICallError as error:
            raise backend_failure("gcs", operation, where, error.code, type(error).__name__) from None
        except (GoogleAuthError, RequestException) as error:
            raise StorageError(f"gcs {operation} {where} at {self.endpoint}: {type(error).__name__}") from None


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

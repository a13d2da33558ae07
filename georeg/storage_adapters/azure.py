"""The registry's `azure` driver: a container in an Azure Blob Storage account.

2.8 knows only accountname, accountkey, container and realm; 3.x adds serviceurl, rootdirectory and
`credentials: {type: shared_key | client_secret | default_credentials}`. Blob names are
`<rootdirectory>/<path>` with the root's slashes trimmed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import SecretStr

from georeg.errors import ConfigError
from georeg.storage_adapters.base import CLIENT_LOCK, StorageError, StorageLocation, backend_failure
from georeg.storage_adapters.params import (
    DriverParameters,
    directory_key,
    location_root,
    normalise_endpoint,
    normalise_root,
    object_key,
    public_url,
    relative_path,
)

PARAMETERS = {
    "accountkey",
    "accountname",
    "connectionstring",  # parsed by 3.x but not used by it either
    "container",
    "credentials",
    "max_retries",
    "realm",
    "retry_delay",
    "rootdirectory",
    "serviceurl",
    "skipverify",
}
CREDENTIAL_TYPES = {"shared_key", "client_secret", "default_credentials"}
DEFAULT_REALM = "core.windows.net"


class AzureAdapter:
    """Reads blobs with azure-storage-blob, signing with the account key or an Azure AD credential."""

    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("azure", parameters, PARAMETERS)
        self.account = params.required("accountname")
        self.container = params.required("container")
        self.root = normalise_root(params.string("rootdirectory"))
        realm = params.string("realm") or DEFAULT_REALM
        self._service_url = params.string("serviceurl") or f"https://{self.account}.blob.{realm}"
        self.endpoint = normalise_endpoint(self._service_url, params.key("serviceurl"))
        self._skip_verify = params.boolean("skipverify", False)
        self._credential_type, self._account_key, self._client_secret = _credentials(params)
        self._client_id = self._tenant_id = None
        if self._credential_type == "client_secret":
            credentials = params.mapping("credentials") or {}
            self._client_id, self._tenant_id = credentials.get("clientid"), credentials.get("tenantid")
            for name, value in (("clientid", self._client_id), ("tenantid", self._tenant_id)):
                if not value:
                    raise ConfigError(f"{params.key('credentials')}.{name}: required for client_secret")
        self._client: Any = None

    def __repr__(self) -> str:
        return (
            f"AzureAdapter(endpoint={self.endpoint!r}, container={self.container!r}, root={location_root(self.root)!r})"
        )

    def location(self) -> StorageLocation:
        return StorageLocation("azure", self.endpoint, self.container, location_root(self.root))

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        with CLIENT_LOCK:  # made once, though the first calls may come from several threads at once
            return self._make_client()

    def _make_client(self) -> Any:
        """The container client, made on first use."""
        if self._client is None:
            from azure.storage.blob import BlobServiceClient

            service = BlobServiceClient(
                account_url=self._service_url,
                credential=self._credential(),
                connection_timeout=10,
                read_timeout=60,
                retry_total=3,
                connection_verify=not self._skip_verify,
            )
            self._client = service.get_container_client(self.container)
        return self._client

    def _credential(self) -> Any:
        if self._credential_type == "shared_key":
            from azure.core.credentials import AzureNamedKeyCredential

            assert self._account_key is not None
            return AzureNamedKeyCredential(self.account, self._account_key.get_secret_value())
        try:
            from azure import identity  # type: ignore[attr-defined]
        except ImportError:
            raise ConfigError(
                f"storage.azure.credentials.type: {self._credential_type} needs the azure-identity package"
            ) from None
        if self._credential_type == "client_secret":
            assert self._client_secret is not None
            return identity.ClientSecretCredential(
                self._tenant_id, self._client_id, self._client_secret.get_secret_value()
            )
        return identity.DefaultAzureCredential()

    def key(self, path: str) -> str:
        return object_key(self.root, path)

    def object_size(self, path: str) -> int | None:
        key = self.key(path)
        properties = self._call("HEAD", key, lambda blob: blob.get_blob_properties())
        return None if properties is None else int(properties.size)

    def read_small(self, path: str) -> bytes | None:
        key = self.key(path)
        return self._call("GET", key, lambda blob: blob.download_blob().readall())

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        prefix = directory_key(self.root, directory)
        with self._failures("LIST", prefix):
            for properties in self.client().list_blobs(name_starts_with=prefix, results_per_page=self.list_page):
                yield relative_path(self.root, properties.name), int(properties.size)

    def _call(self, operation: str, key: str, action: Any) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        with self._failures(operation, key):
            try:
                return action(self.client().get_blob_client(key))
            except ResourceNotFoundError as error:
                if error.error_code == "ContainerNotFound":
                    raise
                return None

    @contextlib.contextmanager
    def _failures(self, operation: str, key: str) -> Iterator[None]:
        """The SDK's errors as StorageErrors that name the call and the blob."""
        from azure.core.exceptions import AzureError, HttpResponseError

        where = f"{self.container}/{key}"
        try:
            yield
        except HttpResponseError as error:
            raise backend_failure("azure", operation, where, error.status_code, error.error_code) from None
        except AzureError as error:
            raise StorageError(
                f"azure {operation} {where} at {public_url(self._service_url)}: {type(error).__name__}"
            ) from None


def _credentials(params: DriverParameters) -> tuple[str, SecretStr | None, SecretStr | None]:
    """(type, account key, client secret): 2.8's accountkey, or 3.x's credentials block."""
    credentials = params.mapping("credentials") or {}
    unknown = set(credentials) - {"type", "clientid", "tenantid", "secret"}
    if unknown:
        raise ConfigError(f"{params.key('credentials')}: unknown parameter(s) {', '.join(sorted(unknown))}")
    kind = str(credentials.get("type") or "shared_key")
    if kind not in CREDENTIAL_TYPES:
        raise ConfigError(f"{params.key('credentials')}.type: expected one of {', '.join(sorted(CREDENTIAL_TYPES))}")
    account_key = params.secret("accountkey", required=kind == "shared_key")
    secret = credentials.get("secret")
    if kind == "client_secret" and not secret:
        raise ConfigError(f"{params.key('credentials')}.secret: required for client_secret")
    return kind, account_key, SecretStr(str(secret)) if secret else None

"""The registry's `azure` driver: a container in an Azure Blob Storage account.

2.8 knows only accountname, accountkey, container and realm; 3.x adds serviceurl, rootdirectory and
`credentials: {type: shared_key | client_secret | default_credentials}`. Blob names are
`<rootdirectory>/<path>` with the root's slashes trimmed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import SecretStr

from georeg.errors import ConfigError
from georeg.storage_adapters.base import listed_md5
from georeg.storage_adapters.object_store import ObjectStoreAdapter
from georeg.storage_adapters.params import DriverParameters, normalise_endpoint, public_url

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


class AzureAdapter(ObjectStoreAdapter):
    """Reads blobs with azure-storage-blob, signing with the account key or an Azure AD credential."""

    backend = "azure"
    known_parameters = PARAMETERS
    bucket_parameter = "container"

    def _configure(self, params: DriverParameters) -> str:
        self.account = params.required("accountname")
        realm = params.string("realm") or DEFAULT_REALM
        self._service_url = params.string("serviceurl") or f"https://{self.account}.blob.{realm}"
        endpoint = normalise_endpoint(self._service_url, params.key("serviceurl"))
        self._skip_verify = params.boolean("skipverify", False)
        self._credential_type, self._account_key, self._client_secret = _credentials(params)
        self._client_id = self._tenant_id = None
        if self._credential_type == "client_secret":
            credentials = params.mapping("credentials") or {}
            self._client_id, self._tenant_id = credentials.get("clientid"), credentials.get("tenantid")
            for name, value in (("clientid", self._client_id), ("tenantid", self._tenant_id)):
                if not value:
                    raise ConfigError(f"{params.key('credentials')}.{name}: required for client_secret")
        return endpoint

    def _make_client(self) -> Any:
        """The container's client."""
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(
            account_url=self._service_url,
            credential=self._credential(),
            connection_timeout=10,
            read_timeout=60,
            retry_total=3,
            connection_verify=not self._skip_verify,
        )
        return service.get_container_client(self.bucket)

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

    def _size(self, client: Any, key: str) -> int:
        return int(client.get_blob_client(key).get_blob_properties().size)

    def _read(self, client: Any, key: str) -> bytes:
        return bytes(client.get_blob_client(key).download_blob().readall())

    def _list(self, client: Any, prefix: str) -> Iterator[tuple[str, int, str | None]]:
        for properties in client.list_blobs(name_starts_with=prefix, results_per_page=self.list_page):
            # The service keeps a Content-MD5 for a blob put in one request; a block list's has none.
            md5 = properties.content_settings.content_md5 if properties.content_settings else None
            yield properties.name, int(properties.size), listed_md5(bytes(md5) if md5 else None)

    def _is_absent(self, error: Exception) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        # A missing container is a ResourceNotFoundError too, but it is a misconfiguration, not an absent blob.
        return isinstance(error, ResourceNotFoundError) and error.error_code != "ContainerNotFound"

    def _service_answer(self, error: Exception) -> tuple[int | None, str | None] | None:
        from azure.core.exceptions import HttpResponseError

        if not isinstance(error, HttpResponseError):
            return None
        return error.status_code, error.error_code

    def _no_answer(self, error: Exception) -> str | None:
        from azure.core.exceptions import AzureError

        # HttpResponseError is an AzureError too, but _service_answer has taken it already.
        return type(error).__name__ if isinstance(error, AzureError) else None

    def _shown_endpoint(self) -> str:
        return public_url(self._service_url)


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

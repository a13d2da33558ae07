"""The registry's `swift` driver: a container in OpenStack Swift (2.8 only; 3.x dropped the driver).

Two things differ from the cloud drivers. Objects live under `<prefix>/files/<path>` (the driver keeps
large-object segments beside them under `<prefix>/segments/`), and the driver trims '/' only from the
ends of that whole string, so prefixes "reg" and "reg/" name different objects and compare different.
And the account a user lands in is only known after authenticating (tempauth's `account:user`, a
Keystone project's catalogue entry in a region), so `location()` authenticates once and names the
storage by the storage URL Swift returns.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

from georeg.errors import ConfigError
from georeg.storage_adapters.base import (
    StorageError,
    StorageLocation,
    backend_failure,
    listed_md5,
    tag_links_in_listing,
)
from georeg.storage_adapters.params import DriverParameters, normalise_endpoint, public_url

PARAMETERS = {
    "accesskey",
    "authurl",
    "authversion",
    "chunksize",
    "container",
    "domain",
    "domainid",
    "endpointtype",
    "insecureskipverify",
    "password",
    "prefix",
    "region",
    "secretkey",
    "tempurlcontainerkey",
    "tempurlmethods",
    "tenant",
    "tenantdomain",
    "tenantdomainid",
    "tenantid",
    "trustid",
    "username",
}
TIMEOUT_S = 30.0


def swift_key(prefix: str, path: str) -> str:
    """The driver's swiftPath: TrimLeft(TrimRight(prefix + "/files" + "/" + path, "/"), "/")."""
    return (prefix + "/files/" + path.lstrip("/")).rstrip("/").lstrip("/")


class SwiftAdapter:
    """Reads objects with python-swiftclient; one connection per thread, as swiftclient's are not shared."""

    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("swift", parameters, PARAMETERS)
        self.authurl = params.required("authurl")
        normalise_endpoint(self.authurl, params.key("authurl"))  # validates it
        self.container = params.required("container")
        self.prefix = params.string("prefix") or ""
        self._username = params.required("username")
        self._password = params.secret("password", required=True)
        for tempurl_key in ("secretkey", "accesskey"):  # for the registry's redirects; georeg never signs URLs
            params.secret(tempurl_key)
        if params.string("trustid"):
            raise ConfigError(f"{params.key('trustid')}: Keystone trusts are not supported by georeg")
        self._auth_version = _auth_version(params, self.authurl)
        self._insecure = params.boolean("insecureskipverify", False)
        self._os_options = {
            name: value
            for name, value in {
                "region_name": params.string("region"),
                "tenant_name": params.string("tenant"),
                "tenant_id": params.string("tenantid"),
                "project_name": params.string("tenant"),
                "project_id": params.string("tenantid"),
                "user_domain_name": params.string("domain"),
                "user_domain_id": params.string("domainid"),
                "project_domain_name": params.string("tenantdomain"),
                "project_domain_id": params.string("tenantdomainid"),
                "endpoint_type": params.string("endpointtype"),
            }.items()
            if value
        }
        self._local = threading.local()
        self._storage_url: str | None = None

    def __repr__(self) -> str:
        return (
            f"SwiftAdapter(authurl={public_url(self.authurl)!r}, container={self.container!r}, prefix={self.prefix!r})"
        )

    def location(self) -> StorageLocation:
        """Authenticates on first call: the storage URL is the account's identity."""
        if self._storage_url is None:
            connection = self.connection()
            try:
                url, _token = connection.get_auth()
            except Exception as error:
                raise self._failure("AUTH", public_url(self.authurl), error) from None
            self._storage_url = normalise_endpoint(url, "swift storage URL")
        return StorageLocation("swift", self._storage_url, self.container, "/" + swift_key(self.prefix, ""))

    def connect(self) -> None:
        self.connection()  # this thread's; the import is what the others no longer wait for

    def connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            from swiftclient.client import Connection

            connection = Connection(
                authurl=self.authurl,
                user=self._username,
                key=self._password.get_secret_value() if self._password else None,
                auth_version=self._auth_version,
                os_options=dict(self._os_options),
                insecure=self._insecure,
                timeout=TIMEOUT_S,
                retries=2,
                starting_backoff=0.5,
            )
            self._local.connection = connection
        return connection

    def key(self, path: str) -> str:
        return swift_key(self.prefix, path)

    def object_size(self, path: str) -> int | None:
        key = self.key(path)
        headers = self._call("HEAD", key, lambda connection: connection.head_object(self.container, key))
        return None if headers is None else int(headers["content-length"])

    def read_small(self, path: str) -> bytes | None:
        key = self.key(path)
        answer = self._call("GET", key, lambda connection: connection.get_object(self.container, key))
        return None if answer is None else bytes(answer[1])

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        for name, listed in self._listing(directory):
            # The registry's driver writes large objects as segments under a zero-byte manifest
            # object: the listing shows 0 bytes, a HEAD the segments' total.
            yield name, int(listed["bytes"]) or None

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        for name, listed in self._listing(directory):
            # An object's hash is its MD5, but a large object's manifest's is not its contents'.
            yield name, listed_md5(listed.get("hash")) if int(listed["bytes"]) else None

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        return tag_links_in_listing(self)

    def _listing(self, directory: str) -> Iterator[tuple[str, dict[str, Any]]]:
        prefix = self.key(directory) + "/"
        start = len(self.key("")) + 1  # swift_key("") is "<prefix>/files", without its trailing '/'
        marker = ""
        while True:
            answer = self._call("LIST", prefix, functools.partial(self._listing_page, prefix, marker))
            page = [] if answer is None else answer[1]  # no container yet: the registry makes it on its first write
            for listed in page:
                yield listed["name"][start:], listed
            if not page:
                return
            marker = page[-1]["name"]

    def _listing_page(self, prefix: str, marker: str, connection: Any) -> Any:
        return connection.get_container(self.container, prefix=prefix, marker=marker, limit=self.list_page)

    def _call(self, operation: str, key: str, action: Any) -> Any:
        try:
            return action(self.connection())
        except Exception as error:
            if getattr(error, "http_status", None) == 404:
                return None  # also when the container is missing; the registry creates it at start
            raise self._failure(operation, f"{self.container}/{key}", error) from None

    def _failure(self, operation: str, where: str, error: Exception) -> StorageError:
        from requests.exceptions import RequestException
        from swiftclient.exceptions import ClientException

        if isinstance(error, ClientException) and error.http_status is not None:
            return backend_failure("swift", operation, where, error.http_status, error.http_reason)
        if isinstance(error, (ClientException, RequestException, OSError)):
            # swiftclient's own messages (for example "needs python-keystoneclient") hold no secrets.
            detail = str(error) if isinstance(error, ClientException) else type(error).__name__
            return StorageError(
                f"swift {operation} {where}: {detail}", transient=not isinstance(error, ClientException)
            )
        raise error


def _auth_version(params: DriverParameters, authurl: str) -> str:
    """Like the driver's client (ncw/swift): explicit authversion, else guessed from the URL."""
    version = params.integer("authversion", 0)
    if not version:
        version = 3 if "v3" in authurl else 2 if "v2" in authurl else 1 if "v1" in authurl else 0
    if version not in (1, 2, 3):
        raise ConfigError(f"{params.key('authversion')}: expected 1, 2 or 3 (it cannot be guessed from authurl)")
    return {1: "1", 2: "2.0", 3: "3"}[version]

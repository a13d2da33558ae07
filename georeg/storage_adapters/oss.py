"""The registry's `oss` driver: a bucket in Alibaba Cloud OSS (2.8 only; 3.x dropped the driver).

Without `endpoint` the driver talks to `<region>.aliyuncs.com`, or `<region>-internal.aliyuncs.com`
with `internal: true`; both reach the same buckets, so both give the same location. `endpoint` is a
host (the scheme comes from `secure`). Object keys are `<rootdirectory>/<path>`, root slashes trimmed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

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

PARAMETERS = {
    "accesskeyid",
    "accesskeysecret",
    "bucket",
    "chunksize",
    "encrypt",
    "encryptionkeyid",
    "endpoint",
    "internal",
    "region",
    "rootdirectory",
    "secure",
}
_INTERNAL_HOST = re.compile(r"(?P<region>.+)-internal\.aliyuncs\.com")
TIMEOUT_S = 30


class OssAdapter:
    """Reads objects with oss2 (path-style requests when the endpoint is an IP address or localhost)."""

    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("oss", parameters, PARAMETERS)
        self.region = params.required("region")
        self.bucket = params.required("bucket")
        self.root = normalise_root(params.string("rootdirectory"))
        self._access_key_id = params.secret("accesskeyid", required=True)
        self._access_key_secret = params.secret("accesskeysecret", required=True)
        scheme = "https" if params.boolean("secure", True) else "http"
        internal = params.boolean("internal", False)
        params.boolean("encrypt", False)
        host = params.string("endpoint") or f"{self.region}{'-internal' if internal else ''}.aliyuncs.com"
        self._endpoint_url = host if "://" in host else f"{scheme}://{host}"
        endpoint = normalise_endpoint(self._endpoint_url, params.key("endpoint"))
        internal_host = _INTERNAL_HOST.fullmatch(endpoint)
        self.endpoint = f"{internal_host.group('region')}.aliyuncs.com" if internal_host else endpoint
        self._bucket: Any = None

    def __repr__(self) -> str:
        return f"OssAdapter(endpoint={self.endpoint!r}, bucket={self.bucket!r}, root={location_root(self.root)!r})"

    def location(self) -> StorageLocation:
        return StorageLocation("oss", self.endpoint, self.bucket, location_root(self.root))

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        with CLIENT_LOCK:  # made once, though the first calls may come from several threads at once
            return self._make_client()

    def _make_client(self) -> Any:
        if self._bucket is None:
            import oss2

            assert self._access_key_id is not None and self._access_key_secret is not None
            auth = oss2.Auth(self._access_key_id.get_secret_value(), self._access_key_secret.get_secret_value())
            self._bucket = oss2.Bucket(auth, self._endpoint_url, self.bucket, connect_timeout=TIMEOUT_S)
        return self._bucket

    def key(self, path: str) -> str:
        return object_key(self.root, path)

    def object_size(self, path: str) -> int | None:
        key = self.key(path)
        result = self._call("HEAD", key, lambda bucket: bucket.head_object(key))
        return None if result is None else int(result.content_length)

    def read_small(self, path: str) -> bytes | None:
        key = self.key(path)
        return self._call("GET", key, lambda bucket: bucket.get_object(key).read())

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        import oss2

        prefix = directory_key(self.root, directory)
        with self._failures("LIST", prefix):
            for listed in oss2.ObjectIterator(self.client(), prefix=prefix, max_keys=self.list_page):
                yield relative_path(self.root, listed.key), int(listed.size)

    def _call(self, operation: str, key: str, action: Any) -> Any:
        from oss2.exceptions import NoSuchBucket, NotFound

        with self._failures(operation, key):
            try:
                return action(self.client())
            except NoSuchBucket:  # a NotFound too, but a missing bucket is an error, not an absent object
                raise
            except NotFound:
                return None

    @contextlib.contextmanager
    def _failures(self, operation: str, key: str) -> Iterator[None]:
        """oss2's errors as StorageErrors that name the call and the object."""
        from oss2.exceptions import OssError, RequestError, ServerError

        where = f"{self.bucket}/{key}"
        try:
            yield
        except RequestError:
            raise StorageError(f"oss {operation} {where} at {self.endpoint}: no answer") from None
        except ServerError as error:
            # Never the error's details: OSS echoes the access key id in signature errors.
            raise backend_failure("oss", operation, where, error.status, error.code or None) from None
        except OssError as error:
            raise StorageError(f"oss {operation} {where}: {type(error).__name__}", transient=False) from None

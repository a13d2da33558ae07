"""The registry's `oss` driver: a bucket in Alibaba Cloud OSS (2.8 only; 3.x dropped the driver).

Without `endpoint` the driver talks to `<region>.aliyuncs.com`, or `<region>-internal.aliyuncs.com`
with `internal: true`; both reach the same buckets, so both give the same location. `endpoint` is a
host (the scheme comes from `secure`). Object keys are `<rootdirectory>/<path>`, root slashes trimmed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from georeg.storage_adapters.base import StorageError, listed_md5
from georeg.storage_adapters.object_store import ObjectStoreAdapter
from georeg.storage_adapters.params import DriverParameters, normalise_endpoint

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


class OssAdapter(ObjectStoreAdapter):
    """Reads objects with oss2 (path-style requests when the endpoint is an IP address or localhost)."""

    backend = "oss"
    known_parameters = PARAMETERS

    def _configure(self, params: DriverParameters) -> str:
        self.region = params.required("region")
        self._access_key_id = params.secret("accesskeyid", required=True)
        self._access_key_secret = params.secret("accesskeysecret", required=True)
        scheme = "https" if params.boolean("secure", True) else "http"
        internal = params.boolean("internal", False)
        params.boolean("encrypt", False)
        host = params.string("endpoint") or f"{self.region}{'-internal' if internal else ''}.aliyuncs.com"
        self._endpoint_url = host if "://" in host else f"{scheme}://{host}"
        endpoint = normalise_endpoint(self._endpoint_url, params.key("endpoint"))
        internal_host = _INTERNAL_HOST.fullmatch(endpoint)
        return f"{internal_host.group('region')}.aliyuncs.com" if internal_host else endpoint

    def _make_client(self) -> Any:
        """oss2's client for the bucket (oss2.Bucket)."""
        import oss2

        assert self._access_key_id is not None and self._access_key_secret is not None
        auth = oss2.Auth(self._access_key_id.get_secret_value(), self._access_key_secret.get_secret_value())
        return oss2.Bucket(auth, self._endpoint_url, self.bucket, connect_timeout=TIMEOUT_S)

    def _size(self, client: Any, key: str) -> int:
        return int(client.head_object(key).content_length)

    def _read(self, client: Any, key: str) -> bytes:
        return bytes(client.get_object(key).read())

    def _list(self, client: Any, prefix: str) -> Iterator[tuple[str, int, str | None]]:
        import oss2

        for listed in oss2.ObjectIterator(client, prefix=prefix, max_keys=self.list_page):
            yield listed.key, int(listed.size), listed_md5(listed.etag)  # a simple PUT's ETag is its MD5

    def _is_absent(self, error: Exception) -> bool:
        from oss2.exceptions import NoSuchBucket, NotFound

        # NoSuchBucket is a NotFound too, but a missing bucket is an error, not an absent object.
        return isinstance(error, NotFound) and not isinstance(error, NoSuchBucket)

    def _service_answer(self, error: Exception) -> tuple[int | None, str | None] | None:
        from oss2.exceptions import ServerError

        if not isinstance(error, ServerError):
            return None
        # Never the error's details: OSS echoes the access key id in signature errors.
        return error.status, error.code or None

    def _no_answer(self, error: Exception) -> str | None:
        from oss2.exceptions import RequestError

        return "no answer" if isinstance(error, RequestError) else None

    def _failure(self, operation: str, where: str, error: Exception) -> StorageError | None:
        from oss2.exceptions import OssError

        failure = super()._failure(operation, where, error)
        if failure is None and isinstance(error, OssError):
            # oss2 refused on its own side (a CRC mismatch, a malformed answer): trying again will not help.
            return StorageError(f"oss {operation} {where}: {type(error).__name__}", transient=False)
        return failure

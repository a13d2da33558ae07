"""The registry's `s3` driver: a bucket on AWS S3 or on any S3-compatible service (MinIO, Ceph, ...).

Object keys are `<rootdirectory>/<path>` with the root's slashes trimmed, as the driver names them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from georeg.errors import ConfigError
from georeg.storage_adapters.base import listed_md5
from georeg.storage_adapters.object_store import ObjectStoreAdapter
from georeg.storage_adapters.params import DriverParameters, normalise_endpoint, public_url

# Everything the 2.8 and 3.x drivers read; only some of it changes where georeg reads from.
PARAMETERS = {
    "accelerate",
    "accesskey",
    "bucket",
    "chunksize",
    "encrypt",
    "forcepathstyle",
    "keyid",
    "loglevel",
    "multipartcopychunksize",
    "multipartcopymaxconcurrency",
    "multipartcopythresholdsize",
    "objectacl",
    "redirectendpoint",
    "region",
    "regionendpoint",
    "rootdirectory",
    "secretkey",
    "secure",
    "sessiontoken",
    "skipverify",
    "storageclass",
    "usedualstack",
    "usefipsendpoint",
    "useragent",
    "v4auth",
}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# s3.amazonaws.com, s3-external-1..., s3.eu-west-1..., s3-eu-west-1..., s3.dualstack.eu-west-1... (and .com.cn)
_AWS_HOST = re.compile(
    r"s3(?:-external-1)?(?:[.-](?:dualstack\.|fips\.)*(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+))?"
    r"\.amazonaws\.com(?P<china>\.cn)?"
)


def aws_endpoint(region: str) -> str:
    """The regional AWS endpoint the driver uses when no regionendpoint is set."""
    suffix = ".cn" if region.startswith("cn-") else ""
    return f"s3.{region}.amazonaws.com{suffix}"


class S3Adapter(ObjectStoreAdapter):
    """Reads objects with boto3 from the bucket, endpoint and credentials of the registry's s3 block."""

    backend = "s3"
    known_parameters = PARAMETERS

    def _configure(self, params: DriverParameters) -> str:
        self.region = params.required("region")
        secure = params.boolean("secure", True)
        self._verify = False if params.boolean("skipverify", False) else None
        self._v4auth = params.boolean("v4auth", True)
        regionendpoint = params.string("regionendpoint")
        # The driver addresses buckets by path whenever regionendpoint is set (3.x: also forcepathstyle).
        self._path_style = bool(regionendpoint) or params.boolean("forcepathstyle", False)
        scheme = "https" if secure else "http"
        self._access_key = params.secret("accesskey")
        self._secret_key = params.secret("secretkey")
        self._session_token = params.secret("sessiontoken")
        if self._access_key and not self._secret_key:
            raise ConfigError(f"{params.key('secretkey')}: required when accesskey is set")
        if self._secret_key and not self._access_key:
            raise ConfigError(f"{params.key('accesskey')}: required when secretkey is set")
        if regionendpoint:
            self._endpoint_url: str | None = (
                regionendpoint if "://" in regionendpoint else f"{scheme}://{regionendpoint}"
            )
            return self._identity(normalise_endpoint(regionendpoint, params.key("regionendpoint")))
        self._endpoint_url = None if secure else f"http://{aws_endpoint(self.region)}"
        return aws_endpoint(self.region)

    def _identity(self, endpoint: str) -> str:
        """AWS's own hosts all reach the same buckets: name them by the region, as without regionendpoint."""
        match = _AWS_HOST.fullmatch(endpoint)
        if not match:
            return endpoint
        return aws_endpoint(match.group("region") or ("cn-north-1" if match.group("china") else self.region))

    def _make_client(self) -> Any:
        """The boto3 client (without keys, boto3's usual credential chain applies)."""
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path" if self._path_style else "auto"},
            signature_version="s3v4" if self._v4auth else "s3",
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        return boto3.session.Session().client(
            "s3",
            region_name=self.region,
            endpoint_url=self._endpoint_url,
            aws_access_key_id=self._access_key.get_secret_value() if self._access_key else None,
            aws_secret_access_key=self._secret_key.get_secret_value() if self._secret_key else None,
            aws_session_token=self._session_token.get_secret_value() if self._session_token else None,
            verify=self._verify,
            config=config,
        )

    def _size(self, client: Any, key: str) -> int:
        return int(client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def _read(self, client: Any, key: str) -> bytes:
        with client.get_object(Bucket=self.bucket, Key=key)["Body"] as body:
            return bytes(body.read())

    def _list(self, client: Any, prefix: str) -> Iterator[tuple[str, int, str | None]]:
        paginator = client.get_paginator("list_objects_v2")
        paging = {"PageSize": self.list_page}
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=paging):
            for item in page.get("Contents", ()):
                # A single PUT's ETag is its MD5; a multipart upload's has a "-<parts>" suffix and is not.
                yield item["Key"], int(item["Size"]), listed_md5(item.get("ETag"))

    def _is_absent(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(error, ClientError) and _error_code(error) in _NOT_FOUND

    def _service_answer(self, error: Exception) -> tuple[int | None, str | None] | None:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return None
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode"), _error_code(error)

    def _no_answer(self, error: Exception) -> str | None:
        from botocore.exceptions import BotoCoreError

        return type(error).__name__ if isinstance(error, BotoCoreError) else None

    def _shown_endpoint(self) -> str:
        return public_url(self._endpoint_url) if self._endpoint_url else self.endpoint


def _error_code(error: Any) -> str:
    """The service's error code of a botocore ClientError ("" if the answer had none)."""
    return str(error.response.get("Error", {}).get("Code", ""))

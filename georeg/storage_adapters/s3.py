"""The registry's `s3` driver: a bucket on AWS S3 or on any S3-compatible service (MinIO, Ceph, ...).

Object keys are `<rootdirectory>/<path>` with the root's slashes trimmed, as the driver names them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
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
    public_url,
    relative_path,
)

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


class S3Adapter:
    """Reads objects with boto3 from the bucket, endpoint and credentials of the registry's s3 block."""

    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("s3", parameters, PARAMETERS)
        self.region = params.required("region")
        self.bucket = params.required("bucket")
        self.root = normalise_root(params.string("rootdirectory"))
        secure = params.boolean("secure", True)
        self._verify = False if params.boolean("skipverify", False) else None
        self._v4auth = params.boolean("v4auth", True)
        regionendpoint = params.string("regionendpoint")
        # The driver addresses buckets by path whenever regionendpoint is set (3.x: also forcepathstyle).
        self._path_style = bool(regionendpoint) or params.boolean("forcepathstyle", False)
        scheme = "https" if secure else "http"
        if regionendpoint:
            self._endpoint_url: str | None = (
                regionendpoint if "://" in regionendpoint else f"{scheme}://{regionendpoint}"
            )
            self.endpoint = self._identity(normalise_endpoint(regionendpoint, params.key("regionendpoint")))
        else:
            self._endpoint_url = None if secure else f"http://{aws_endpoint(self.region)}"
            self.endpoint = aws_endpoint(self.region)
        self._access_key = params.secret("accesskey")
        self._secret_key = params.secret("secretkey")
        self._session_token = params.secret("sessiontoken")
        if self._access_key and not self._secret_key:
            raise ConfigError(f"{params.key('secretkey')}: required when accesskey is set")
        if self._secret_key and not self._access_key:
            raise ConfigError(f"{params.key('accesskey')}: required when secretkey is set")
        self._client: Any = None

    def _identity(self, endpoint: str) -> str:
        """AWS's own hosts all reach the same buckets: name them by the region, as without regionendpoint."""
        match = _AWS_HOST.fullmatch(endpoint)
        if not match:
            return endpoint
        return aws_endpoint(match.group("region") or ("cn-north-1" if match.group("china") else self.region))

    def __repr__(self) -> str:
        return f"S3Adapter(endpoint={self.endpoint!r}, bucket={self.bucket!r}, root={location_root(self.root)!r})"

    def location(self) -> StorageLocation:
        return StorageLocation("s3", self.endpoint, self.bucket, location_root(self.root))

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        with CLIENT_LOCK:  # made once, though the first calls may come from several threads at once
            return self._make_client()

    def _make_client(self) -> Any:
        """The boto3 client, made on first use (without keys, boto3's usual credential chain applies)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": "path" if self._path_style else "auto"},
                signature_version="s3v4" if self._v4auth else "s3",
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            self._client = boto3.session.Session().client(
                "s3",
                region_name=self.region,
                endpoint_url=self._endpoint_url,
                aws_access_key_id=self._access_key.get_secret_value() if self._access_key else None,
                aws_secret_access_key=self._secret_key.get_secret_value() if self._secret_key else None,
                aws_session_token=self._session_token.get_secret_value() if self._session_token else None,
                verify=self._verify,
                config=config,
            )
        return self._client

    def key(self, path: str) -> str:
        return object_key(self.root, path)

    def object_size(self, path: str) -> int | None:
        response = self._call("HEAD", path, "head_object")
        return None if response is None else int(response["ContentLength"])

    def read_small(self, path: str) -> bytes | None:
        response = self._call("GET", path, "get_object")
        if response is None:
            return None
        with response["Body"] as body:
            return bytes(body.read())

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        prefix = directory_key(self.root, directory)
        with self._failures("LIST", prefix):
            paginator = self.client().get_paginator("list_objects_v2")
            paging = {"PageSize": self.list_page}
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=paging):
                for item in page.get("Contents", ()):
                    yield relative_path(self.root, item["Key"]), int(item["Size"])

    def _call(self, operation: str, path: str, method: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        key = self.key(path)
        with self._failures(operation, key):
            try:
                return dict(getattr(self.client(), method)(Bucket=self.bucket, Key=key))
            except ClientError as error:
                if str(error.response.get("Error", {}).get("Code", "")) in _NOT_FOUND:
                    return None
                raise

    @contextlib.contextmanager
    def _failures(self, operation: str, key: str) -> Iterator[None]:
        """botocore's errors as StorageErrors that name the call and the object."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{self.bucket}/{key}"
        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise backend_failure("s3", operation, where, status, code) from None
        except BotoCoreError as error:
            endpoint = public_url(self._endpoint_url) if self._endpoint_url else self.endpoint
            raise StorageError(f"s3 {operation} {where} at {endpoint}: {type(error).__name__}") from None

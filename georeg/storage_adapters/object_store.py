"""What the s3, gcs, azure and oss adapters have in common: each reads one bucket (azure: a container)
through an SDK client, names objects `<root>/<path>` with the root's slashes trimmed, and sorts its SDK's
errors into absent objects, refusals and failures to get any answer.

A backend's module keeps only what is its own: its parameters, how to make its client, the three calls
(size, read, list) and which of its SDK's exceptions mean what.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

from georeg.storage_adapters.base import StorageError, StorageLocation, backend_failure, tag_links_in_listing
from georeg.storage_adapters.params import (
    DriverParameters,
    directory_key,
    location_root,
    normalise_root,
    object_key,
    relative_path,
)

T = TypeVar("T")

# Guards the lazy creation of an SDK client: shared-storage checks run in several threads at once,
# and each would otherwise build a client of its own (boto3 loads its service model each time).
CLIENT_LOCK = threading.RLock()


class ObjectStoreAdapter(ABC):
    """A storage adapter for a bucket of an object store; subclasses fill in the methods marked abstract."""

    backend: ClassVar[str]  # the driver's name, as in StorageLocation, in error messages and in config keys
    known_parameters: ClassVar[set[str]]  # every parameter the driver reads, whether georeg uses it or not
    bucket_parameter: ClassVar[str] = "bucket"  # what the driver calls its bucket (azure: container)
    list_page = 1000  # objects per listing request

    def __init__(self, parameters: dict[str, Any]) -> None:
        self._client: Any = None
        params = DriverParameters(self.backend, parameters, self.known_parameters)
        self.bucket = params.required(self.bucket_parameter)
        self.root = normalise_root(params.string("rootdirectory"))  # the same for every cloud driver
        self.endpoint = self._configure(params)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(endpoint={self.endpoint!r}, {self.bucket_parameter}={self.bucket!r},"
            f" root={location_root(self.root)!r})"
        )

    def location(self) -> StorageLocation:
        return StorageLocation(self.backend, self.endpoint, self.bucket, location_root(self.root))

    def connect(self) -> None:
        self.client()

    def client(self) -> Any:
        with CLIENT_LOCK:  # made once, though the first calls may come from several threads at once
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def key(self, path: str) -> str:
        return object_key(self.root, path)

    def object_size(self, path: str) -> int | None:
        key = self.key(path)
        return self._call("HEAD", key, lambda client: self._size(client, key))

    def read_small(self, path: str) -> bytes | None:
        key = self.key(path)
        return self._call("GET", key, lambda client: self._read(client, key))

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        for path, size, _md5 in self._listing(directory):
            yield path, size

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        for path, _size, md5 in self._listing(directory):
            yield path, md5

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        return tag_links_in_listing(self)

    def _listing(self, directory: str) -> Iterator[tuple[str, int, str | None]]:
        prefix = directory_key(self.root, directory)
        with self._failures("LIST", prefix):
            for key, size, md5 in self._list(self.client(), prefix):
                yield relative_path(self.root, key), size, md5

    # What each backend supplies.

    @abstractmethod
    def _configure(self, params: DriverParameters) -> str:
        """Read the backend's own parameters; return its endpoint, normalised (see normalise_endpoint) so
        that two spellings of one service give one location."""

    @abstractmethod
    def _make_client(self) -> Any:
        """The SDK's client for the bucket (called once, under CLIENT_LOCK)."""

    @abstractmethod
    def _size(self, client: Any, key: str) -> int | None:
        """The size of the object at `key`; None (or the SDK's not-found error) if it is absent."""

    @abstractmethod
    def _read(self, client: Any, key: str) -> bytes:
        """The contents of the object at `key`."""

    @abstractmethod
    def _list(self, client: Any, prefix: str) -> Iterable[tuple[str, int, str | None]]:
        """(key, size, MD5 hex or None: see `listed_md5`) of every object whose key starts with `prefix`,
        `list_page` objects a request."""

    @abstractmethod
    def _is_absent(self, error: Exception) -> bool:
        """Whether `error` says the object does not exist. Not when the bucket is missing: that is a
        misconfiguration to report, not an answer about the object."""

    @abstractmethod
    def _service_answer(self, error: Exception) -> tuple[int | None, str | None] | None:
        """(HTTP status, the service's error code) if `error` is the service refusing or failing the
        request; `backend_failure` tells denied (permanent) from throttled or failing (transient)."""

    @abstractmethod
    def _no_answer(self, error: Exception) -> str | None:
        """What to show of `error` if the request got no answer (unreachable, timed out, nothing to sign
        it with): such failures count as transient. None if `error` is not one of those."""

    def _shown_endpoint(self) -> str:
        """The endpoint as messages show it."""
        return self.endpoint

    # The template that uses them.

    def _call(self, operation: str, key: str, action: Callable[[Any], T | None]) -> T | None:
        """`action(client)`, or None if it finds the object absent."""
        with self._failures(operation, key):
            try:
                return action(self.client())
            except Exception as error:
                if self._is_absent(error):
                    return None
                raise

    @contextlib.contextmanager
    def _failures(self, operation: str, key: str) -> Iterator[None]:
        """The SDK's errors as StorageErrors that name the call and the object; others pass unchanged."""
        try:
            yield
        except Exception as error:
            failure = self._failure(operation, f"{self.bucket}/{key}", error)
            if failure is None:
                raise
            raise failure from None  # the SDK's own exception may quote credentials

    def _failure(self, operation: str, where: str, error: Exception) -> StorageError | None:
        answer = self._service_answer(error)
        if answer is not None:
            return backend_failure(self.backend, operation, where, *answer)
        detail = self._no_answer(error)
        if detail is not None:
            return StorageError(f"{self.backend} {operation} {where} at {self._shown_endpoint()}: {detail}")
        return None

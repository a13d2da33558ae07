"""The registry's `inmemory` driver: data in the registry process's memory, which nothing else can read.

Such storage is never shared, not even by two registries on one host, so every adapter gets a
location of its own and answers "not there" for every object.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from georeg.storage_adapters.base import StorageLocation
from georeg.storage_adapters.params import DriverParameters


class InMemoryAdapter:
    def __init__(self, parameters: dict[str, Any]) -> None:
        DriverParameters("inmemory", parameters, set())
        self._identity = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"

    def __repr__(self) -> str:
        return "InMemoryAdapter()"

    def location(self) -> StorageLocation:
        return StorageLocation("inmemory", self._identity, "", "/")

    def connect(self) -> None:
        pass  # nothing to make

    def object_size(self, path: str) -> int | None:
        return None

    def read_small(self, path: str) -> bytes | None:
        return None

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        return iter(())

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        return iter(())

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        return iter(())

"""The registry's `filesystem` driver: a directory on a local disk (never shared between sites)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from georeg.storage_adapters.base import REPOSITORIES_DIRECTORY, StorageLocation
from georeg.storage_adapters.params import DriverParameters

DEFAULT_ROOT = "/var/lib/registry"  # the driver's own default


class FilesystemAdapter:
    def __init__(self, parameters: dict[str, Any]) -> None:
        params = DriverParameters("filesystem", parameters, {"rootdirectory", "maxthreads"})
        self.root = Path(params.string("rootdirectory") or DEFAULT_ROOT)
        params.integer("maxthreads")

    def __repr__(self) -> str:
        return f"FilesystemAdapter(root={str(self.root)!r})"

    def location(self) -> StorageLocation:
        # A local directory is only the same storage on the same host.
        return StorageLocation("filesystem", socket.gethostname(), "", str(self.root.resolve()))

    def connect(self) -> None:
        pass  # nothing to make

    def object_size(self, path: str) -> int | None:
        try:
            return (self.root / path).stat().st_size
        except FileNotFoundError:
            return None

    def read_small(self, path: str) -> bytes | None:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            return None

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        for parent, _directories, files in os.walk(self.root / directory.strip("/")):
            for name in files:
                path = Path(parent, name)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # deleted since it was listed
                    continue
                yield path.relative_to(self.root).as_posix(), size

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        # A file system keeps no checksum; reading a local file costs about what checksumming it would.
        for path, _size in self.list_objects(directory):
            yield path, None

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        # Only the tags' links are walked: the blob and revision links beside them are most of a
        # repository's files. A link is read for its MD5 (a file system shows none), which on a local
        # disk costs what the stat of a listing would.
        yield from self._tag_links_under(REPOSITORIES_DIRECTORY.rstrip("/"))

    def _tag_links_under(self, directory: str) -> Iterator[tuple[str, str]]:
        for entry in _entries(self.root / directory):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name == "_manifests":
                for tag in _entries(Path(entry.path, "tags")):
                    path = f"{directory}/_manifests/tags/{tag.name}/current/link"
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # deleted since listed
                        yield path, hashlib.md5((self.root / path).read_bytes()).hexdigest()
            elif not entry.name.startswith("_"):  # `_layers`, `_uploads`: no repository starts with '_'
                yield from self._tag_links_under(f"{directory}/{entry.name}")


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []

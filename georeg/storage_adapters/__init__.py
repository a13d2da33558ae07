"""Storage adapters: read a registry's storage directly, from the same `storage:` block the registry uses."""

from __future__ import annotations

from typing import Any

from georeg.errors import ConfigError
from georeg.storage_adapters.base import (
    StorageAdapter,
    StorageLocation,
    blob_size,
    has_manifest_revision,
    tag_digest,
)
from georeg.storage_adapters.filesystem import FilesystemAdapter

ADAPTERS: dict[str, type[StorageAdapter]] = {"filesystem": FilesystemAdapter}
# Keys of a registry's storage block that configure the registry, not the driver.
_REGISTRY_KEYS = {"delete", "maintenance", "cache", "redirect", "tag"}

__all__ = [
    "ADAPTERS",
    "StorageAdapter",
    "StorageLocation",
    "blob_size",
    "build_adapter",
    "has_manifest_revision",
    "tag_digest",
]


def build_adapter(storage: dict[str, Any]) -> StorageAdapter:
    """The adapter for a registry `storage:` block such as {"filesystem": {"rootdirectory": ...}}."""
    drivers = [key for key in storage if key not in _REGISTRY_KEYS]
    if len(drivers) != 1:
        raise ConfigError(f"storage: expected exactly one driver, found {drivers or 'none'}")
    driver = drivers[0]
    if driver not in ADAPTERS:
        raise ConfigError(f"storage.{driver}: no adapter for this driver (known: {', '.join(ADAPTERS)})")
    return ADAPTERS[driver](storage[driver] or {})

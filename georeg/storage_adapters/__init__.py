"""Storage adapters: read a registry's storage directly, from the same `storage:` block the registry uses.

One adapter per registry storage driver, each taking that driver's own parameters, so a block can be
copied from (or, with `registry_config: /path/config.yml`, read straight out of) the registry's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from georeg.errors import ConfigError
from georeg.storage_adapters.azure import AzureAdapter
from georeg.storage_adapters.base import (
    StorageAdapter,
    StorageError,
    StorageLocation,
    blob_size,
    has_manifest_revision,
    tag_digest,
)
from georeg.storage_adapters.filesystem import FilesystemAdapter
from georeg.storage_adapters.gcs import GcsAdapter
from georeg.storage_adapters.inmemory import InMemoryAdapter
from georeg.storage_adapters.inventory import BlobInventory
from georeg.storage_adapters.oss import OssAdapter
from georeg.storage_adapters.s3 import S3Adapter
from georeg.storage_adapters.swift import SwiftAdapter
from georeg.storage_adapters.tag_links import StorageTags, TagLinks

ADAPTERS: dict[str, type[StorageAdapter]] = {
    "azure": AzureAdapter,
    "filesystem": FilesystemAdapter,
    "gcs": GcsAdapter,
    "inmemory": InMemoryAdapter,
    "oss": OssAdapter,
    "s3": S3Adapter,
    "swift": SwiftAdapter,
}
# Keys of a registry's storage block that configure the registry, not the driver.
_REGISTRY_KEYS = {"delete", "maintenance", "cache", "redirect", "tag"}
REGISTRY_CONFIG_KEY = "registry_config"

__all__ = [
    "ADAPTERS",
    "BlobInventory",
    "StorageAdapter",
    "StorageError",
    "StorageLocation",
    "StorageTags",
    "TagLinks",
    "blob_size",
    "build_adapter",
    "has_manifest_revision",
    "registry_storage_block",
    "tag_digest",
]


def build_adapter(storage: Mapping[str, Any], *, base_dir: Path | None = None) -> StorageAdapter:
    """The adapter for a registry `storage:` block such as {"s3": {"bucket": ..., "region": ...}}.

    `{"registry_config": PATH}` instead reads the registry's own config.yml and uses its `storage:`
    block; a relative PATH is relative to `base_dir` (the directory of georeg's config) if given.
    """
    if not isinstance(storage, Mapping):
        raise ConfigError("storage: expected a mapping")
    if REGISTRY_CONFIG_KEY in storage:
        if len(storage) > 1:
            raise ConfigError(f"storage.{REGISTRY_CONFIG_KEY}: give either this or a driver block, not both")
        storage = registry_storage_block(storage[REGISTRY_CONFIG_KEY], base_dir)
    drivers = [key for key in storage if key not in _REGISTRY_KEYS]
    if len(drivers) != 1:
        raise ConfigError(f"storage: expected exactly one driver, found {drivers or 'none'}")
    driver = drivers[0]
    if driver not in ADAPTERS:
        raise ConfigError(f"storage.{driver}: no adapter for this driver (known: {', '.join(ADAPTERS)})")
    return ADAPTERS[driver](storage[driver] or {})


def registry_storage_block(path: str | Path, base_dir: Path | None = None) -> dict[str, Any]:
    """The `storage:` block of a registry config file."""
    key = f"storage.{REGISTRY_CONFIG_KEY}"
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{key}: expected the path of the registry's config.yml")
    location = Path(path).expanduser()
    if not location.is_absolute() and base_dir is not None:
        location = base_dir / location
    try:
        config = yaml.safe_load(location.read_text())
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {location}: {error.strerror or type(error).__name__}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{key}: {location} is not valid YAML") from None
    storage = config.get("storage") if isinstance(config, dict) else None
    if not isinstance(storage, dict) or not storage:
        raise ConfigError(f"{key}: {location} has no storage: block")
    return storage

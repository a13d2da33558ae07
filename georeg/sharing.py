"""Whether a secondary shares the primary's storage, so that replicating copies nothing.

When both registries keep their data in the same place (the same s3 bucket and root, the same swift
container, ...), everything the primary writes is already the secondary's: replication only has to
confirm that the secondary serves it. Concluding "shared" wrongly would leave the secondary missing
data while reporting success, so the decision compares full storage locations (backend, endpoint or
account, bucket or container, root) and anything short of equal means copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from georeg.config import GeoregConfig, SecondaryConfig
from georeg.errors import ConfigError
from georeg.storage_adapters import StorageAdapter, StorageLocation, build_adapter


class ReplicationMode(str, Enum):
    SHARED = "shared"  # same storage: confirm, copy nothing
    COPY = "copy"  # separate storage: copy through the registry API


@dataclass(frozen=True)
class ModeDecision:
    mode: ReplicationMode
    reason: str
    storage: StorageAdapter | None = None  # the secondary's storage, to confirm blobs in shared mode


def decide_mode(config: GeoregConfig, secondary: SecondaryConfig) -> ModeDecision:
    """How `secondary` is replicated, and why; ConfigError when `mode: shared` cannot be honoured."""
    key = f"secondaries[{config.secondaries.index(secondary)}].mode"
    if secondary.mode == "copy":
        return ModeDecision(ReplicationMode.COPY, f"{key} is copy")
    if not config.primary.storage or not secondary.storage:
        if secondary.mode == "shared":
            raise ConfigError(f"{key}: shared needs a storage: block for both the primary and {secondary.name}")
        return ModeDecision(ReplicationMode.COPY, "no storage: block for both registries")
    primary_location = build_adapter(config.primary.storage).location()
    secondary_storage = build_adapter(secondary.storage)
    secondary_location = secondary_storage.location()
    if primary_location == secondary_location:
        return ModeDecision(ReplicationMode.SHARED, f"both store in {describe(primary_location)}", secondary_storage)
    difference = (
        f"the primary stores in {describe(primary_location)}, {secondary.name} in {describe(secondary_location)}"
    )
    if secondary.mode == "shared":
        raise ConfigError(f"{key}: shared is refused: {difference}; the secondary would miss data")
    return ModeDecision(ReplicationMode.COPY, difference)


def describe(location: StorageLocation) -> str:
    where = "/".join(part for part in (location.endpoint, location.bucket, location.root.strip("/")) if part)
    return f"{location.backend}:{where}"

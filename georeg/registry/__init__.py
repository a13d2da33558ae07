"""Talking to registries: the HTTP client, its auth, token minting and manifests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from georeg.config import GeoregConfig, SecondaryConfig
from georeg.limits import RegistryLimits
from georeg.registry.auth import PULL_ONLY, PULL_PUSH_DELETE
from georeg.registry.client import ClientStats, RegistryClient
from georeg.registry.manifests import Descriptor, Manifest

if TYPE_CHECKING:
    from georeg.state import StateStore

__all__ = [
    "ClientStats",
    "Descriptor",
    "Manifest",
    "RegistryClient",
    "primary_client",
    "secondary_client",
]


def primary_client(config: GeoregConfig, store: StateStore | None = None) -> RegistryClient:
    """The primary is only ever read: its tokens carry pull and nothing else.

    With `store`, the client shares its registry's pauses (429s) with every other worker."""
    return RegistryClient(
        "primary",
        config.primary,
        config.replication,
        allowed_actions=PULL_ONLY,
        limits=RegistryLimits.of(config.primary, store),
    )


def secondary_client(
    config: GeoregConfig, secondary: SecondaryConfig, store: StateStore | None = None
) -> RegistryClient:
    return RegistryClient(
        secondary.name,
        secondary,
        config.replication,
        allowed_actions=PULL_PUSH_DELETE,
        limits=RegistryLimits.of(secondary, store),
    )

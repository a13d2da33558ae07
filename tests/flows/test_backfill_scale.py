"""A first backfill of a primary shaped like a real one, at CI size: every tag arrives, no repository fails.

The primary is written straight into its storage (`tests/support/registry_layout.py`): tags sharing
layers within a repository, bases shared across repositories, multi-arch indexes, nested names and
one wide repository. Correctness only; `benchmarks/scale.py` measures the same at full size.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from georeg.errors import ReplicationError
from georeg.flows.backfill import backfill
from tests.flows.test_backfill import listing
from tests.support.registry import RegistryProcess
from tests.support.registry_layout import Shape, write_primary

pytestmark = pytest.mark.usefixtures("prefect_api_url")

SHAPE = Shape(repositories=200, tags=5, wide_repositories=1, wide_tags=100, index_every=50, seed=2026)


def catalog(url: str) -> list[str]:
    response = httpx.get(f"{url}/v2/_catalog", params={"n": 1000}, timeout=30)
    response.raise_for_status()
    assert "next" not in response.links  # one page holds this many
    return response.json()["repositories"]


async def test_a_first_backfill_of_a_realistic_primary_converges_without_failures(tmp_path: Path, write_config):
    layout = write_primary(tmp_path / "primary-root", SHAPE)
    assert layout.tag_count == 1095 and layout.indexes >= 2
    storage = {"filesystem": {"rootdirectory": str(layout.root)}}
    with (
        RegistryProcess(tmp_path / "primary", storage=storage) as primary,
        RegistryProcess(tmp_path / "secondary") as secondary,
    ):
        write_config(primary.url, secondary.url)
        try:
            [summary] = await backfill()
        except ReplicationError as error:  # names the failed repositories and their errors
            pytest.fail(f"the first backfill failed repositories: {error}")

        assert summary["repositories"] == SHAPE.repositories and summary["failed"] == 0
        assert summary["tags_replicated"] == layout.tag_count
        assert catalog(secondary.url) == catalog(primary.url) == sorted(layout.tags)
        repositories = sorted(layout.tags)
        assert listing(secondary.url, repositories) == listing(primary.url, repositories) == layout.tags

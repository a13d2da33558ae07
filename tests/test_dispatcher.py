"""The dispatcher's shared Prefect client: one client for the flow runs it watches or runs inline."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from georeg.dispatcher import SharedPrefectClient

pytestmark = pytest.mark.usefixtures("prefect_api_url")


@flow
async def trivial(value: int) -> int:
    return value


async def test_inside_installed_prefects_own_get_client_answers_with_the_shared_client():
    shared = SharedPrefectClient()
    try:
        client = await shared.client()
        assert await shared.client() is client
        async with shared.installed():
            assert get_client() is client
            async with get_client() as inner:  # as Prefect's code does: entering and leaving keeps it open
                assert await inner.api_healthcheck() is None
        assert get_client() is not client  # outside the block, Prefect makes its own clients again
        assert await client.api_healthcheck() is None
    finally:
        await shared.close()


async def test_inline_flow_runs_share_the_client_and_leave_it_open():
    shared = SharedPrefectClient()
    try:
        async with shared.installed():
            assert await trivial(1) == 1
            assert await trivial(2) == 2
        assert await (await shared.client()).api_healthcheck() is None
    finally:
        await shared.close()


async def test_after_close_the_next_use_opens_a_new_client():
    shared = SharedPrefectClient()
    first = await shared.client()
    await shared.close()
    await shared.close()  # closing twice is harmless
    second = await shared.client()
    try:
        assert second is not first
        assert await second.api_healthcheck() is None
    finally:
        await shared.close()

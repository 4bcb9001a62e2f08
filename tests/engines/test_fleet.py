"""Fleet bookkeeping (app/engines/fleet.py): which server takes the next page, waiting for a slot, credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from app.engines.fleet import Endpoint, Fleet, display_url

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as shared:  # never used to send: the fleet only does bookkeeping
        yield shared


def fleet_of(client: httpx.AsyncClient, *capacities: int) -> Fleet:
    return Fleet(
        [Endpoint(index=i, url=f"http://s{i}:8001/v1", capacity=c, client=client) for i, c in enumerate(capacities)]
    )


async def test_the_least_loaded_relative_to_capacity_is_picked(client: httpx.AsyncClient) -> None:
    fleet = fleet_of(client, 4, 2)
    big, small = fleet.endpoints
    big.in_flight, small.in_flight = 2, 0
    assert fleet.pick() is small  # 0/2 < 2/4
    big.in_flight, small.in_flight = 1, 1
    assert fleet.pick() is big  # 1/4 < 1/2
    big.in_flight, small.in_flight = 4, 2
    assert fleet.pick() is None  # every slot taken


async def test_servers_out_of_the_rotation_are_skipped_until_none_is_left(client: httpx.AsyncClient) -> None:
    fleet = fleet_of(client, 2, 2)
    first, second = fleet.endpoints
    fleet.mark_down(first)
    assert fleet.pick() is second
    second.in_flight = 2
    assert fleet.pick() is None  # a full healthy server is waited for, not the broken one
    fleet.mark_down(second)
    assert fleet.pick() is first  # none healthy: each attempt is a probe (the retry budget bounds it)


async def test_a_retry_prefers_another_server(client: httpx.AsyncClient) -> None:
    fleet = fleet_of(client, 2, 2)
    first, second = fleet.endpoints
    assert fleet.pick(avoid=first) is second
    second.in_flight = 2
    assert fleet.pick(avoid=first) is first  # the only free slot


async def test_a_waiter_gets_the_slot_freed_and_a_cancelled_waiter_passes_it_on(client: httpx.AsyncClient) -> None:
    fleet = fleet_of(client, 1)
    [only] = fleet.endpoints
    assert await fleet.acquire() is only
    cancelled = asyncio.create_task(fleet.acquire())
    waiting = asyncio.create_task(fleet.acquire())
    await asyncio.sleep(0)
    fleet.release(only)  # wakes `cancelled` first ...
    cancelled.cancel()  # ... which leaves before taking the slot: `waiting` must get it
    async with asyncio.timeout(5):
        assert await waiting is only
    assert only.in_flight == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled


def test_display_url_drops_credentials_and_query() -> None:
    assert display_url("https://user:pw@vllm.internal:8443/v1?token=x") == "https://vllm.internal:8443/v1"
    assert display_url("http://[::1]:8001/v1") == "http://[::1]:8001/v1"
    assert display_url("http://vllm/v1") == "http://vllm/v1"

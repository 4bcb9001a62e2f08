"""VLLMEngine against a fleet of stand-ins: load split by speed, failover, probing back, all down, settings."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from app.engines.base import Sampling
from app.engines.vllm import VLLMEngine
from app.errors import EngineUnavailable
from app.settings import SettingsError
from tests.conftest import make_settings
from tests.engines.test_vllm import page, sampling_of, settings_for
from tests.support.documents import page_id_of
from tests.support.http import free_port
from tests.support.openai_stub import Reply, RequestRecord, StubRequest, StubVLLM

pytestmark = pytest.mark.anyio


class Server:
    """A stand-in answering each page after `latency_s`; `die()` drops the pages it holds, like a crashed vLLM."""

    def __init__(self, latency_s: float, port: int = 0) -> None:
        self.latency_s = latency_s
        self.dying = threading.Event()
        self.stub = StubVLLM(self.respond, port=port)

    async def respond(self, request: StubRequest) -> Reply:
        await asyncio.sleep(self.latency_s)
        if self.dying.is_set():
            return Reply(drop_connection=True)
        return Reply(text=f"page {page_id_of(request.image)}")

    def die(self) -> None:
        self.dying.set()
        self.stub.stop()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stub.stop()


def start(servers: list[Server], *latencies: float) -> list[Server]:
    for latency in latencies:
        server = Server(latency)
        server.stub.start()
        servers.append(server)
    return servers


def fleet_url(servers: list[Server]) -> str:
    return ",".join(server.stub.base_url for server in servers)


def answers_per_page(stubs: list[StubVLLM]) -> Counter[str]:
    """How many times each page (by its PNG's sha256) was answered 200, over all servers."""
    return Counter(record.sha256 for stub in stubs for record in stub.requests if record.outcome == "ok")


def assert_never_at_two_servers_at_once(stubs: list[StubVLLM]) -> None:
    """Attempts at one page never overlap in time: a page is sent again only after its last attempt ended."""
    by_page: dict[str, list[RequestRecord]] = defaultdict(list)
    for stub in stubs:
        for record in stub.requests:
            by_page[record.sha256].append(record)
    for records in by_page.values():
        records.sort(key=lambda r: r.received_at)
        for before, after in itertools.pairwise(records):
            assert before.finished_at is not None
            assert before.finished_at <= after.received_at


async def run_pages(engine: VLLMEngine, ids: range, sampling: Sampling) -> list[str]:
    results = await asyncio.gather(*(engine.recognize(page(i), sampling) for i in ids))
    return [result.text for result in results]


# --------------------------------------------------------------------------- load split


async def test_pages_split_in_proportion_to_speed(servers: list[Server]) -> None:
    """Least relative load keeps every server's slots full, so a faster server (freeing its slots sooner) gets
    more pages: each server's share of 200 pages is within 20% of its share of the speed.

    Latencies are long next to the per-request overhead of a loaded test machine (tens of ms for loopback HTTP
    through three threads), which would otherwise even out the speeds; an even split (1/3 each) fails.
    """
    latencies = (0.3, 0.4, 0.6)
    start(servers, *latencies)
    settings = settings_for(fleet_url(servers), max_concurrent_pages=6)
    async with VLLMEngine(settings) as engine:
        async with asyncio.timeout(60):
            texts = await run_pages(engine, range(1, 201), sampling_of(settings))
        states = engine.info().endpoints
    assert texts == [f"page {i}" for i in range(1, 201)]
    speeds = [1 / latency for latency in latencies]
    counts = [server.stub.completed for server in servers]
    assert sum(counts) == 200
    for count, speed in zip(counts, speeds, strict=True):
        expected = speed / sum(speeds)
        assert abs(count / 200 - expected) <= 0.2 * expected, (counts, [round(200 * v / sum(speeds)) for v in speeds])
    assert [state.pages for state in states] == counts
    assert all(server.stub.max_in_flight <= 6 and server.stub.violations == [] for server in servers)


async def test_a_per_server_capacity_bounds_that_server(servers: list[Server]) -> None:
    start(servers, 0.02, 0.02)
    url = f"{servers[0].stub.base_url}#capacity=1,{servers[1].stub.base_url}"
    settings = settings_for(url, max_concurrent_pages=3)
    async with VLLMEngine(settings) as engine:
        assert engine.info().max_pages_in_flight == 4
        await run_pages(engine, range(1, 41), sampling_of(settings))
        assert [state.capacity for state in engine.info().endpoints] == [1, 3]
    assert servers[0].stub.max_in_flight == 1
    assert servers[1].stub.max_in_flight == 3


# --------------------------------------------------------------------------- failover and probing back


async def test_a_server_dying_mid_run_loses_no_page_and_comes_back(
    servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.engines.vllm.PROBE_INTERVAL_S", 0.05)
    start(servers, 0.03, 0.03, 0.03)
    dead = servers[2]
    settings = settings_for(fleet_url(servers), max_concurrent_pages=4, vllm_max_retries=2)
    sampling = sampling_of(settings)
    async with VLLMEngine(settings) as engine:
        run = asyncio.create_task(run_pages(engine, range(1, 151), sampling))
        # Kill it while it holds pages.
        await asyncio.to_thread(dead.stub.wait_until, lambda s: s.completed >= 5 and s.in_flight >= 2, 20.0)
        await asyncio.to_thread(dead.die)
        async with asyncio.timeout(60):
            texts = await run
        assert texts == [f"page {i}" for i in range(1, 151)]
        stubs = [server.stub for server in servers]
        answers = answers_per_page(stubs)
        assert len(answers) == 150
        assert set(answers.values()) == {1}
        assert dead.stub.dropped >= 2  # pages died with it ...
        moved = {r.sha256 for r in dead.stub.requests if r.outcome != "ok"}
        assert moved
        assert all(any(r.sha256 == sha and r.outcome == "ok" for s in stubs[:2] for r in s.requests) for sha in moved)
        assert_never_at_two_servers_at_once(stubs)
        [_, _, state] = engine.info().endpoints
        assert not state.healthy
        assert state.errors >= 2

        # Restarted on the same port: a probe puts it back in the rotation, and it takes pages again.
        revived = Server(0.03, port=dead.stub.port)
        revived.stub.start()
        servers.append(revived)
        for _ in range(500):  # probes run every 0.05 s here
            if engine.info().endpoints[2].healthy:
                break
            await asyncio.sleep(0.02)
        assert engine.info().endpoints[2].healthy
        await run_pages(engine, range(151, 181), sampling)
    assert revived.stub.completed > 0


async def test_a_failing_server_leaves_the_rotation(servers: list[Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """5xx marks a server down: later pages go to the others until a probe brings it back."""
    monkeypatch.setattr("app.engines.vllm.PROBE_INTERVAL_S", 3600)  # no probe during this test
    start(servers, 0.01, 0.01)
    broken = servers[0].stub
    broken.responder = lambda request: Reply(status=503, message="overloaded")
    # One slot each: the second page is at the good server while the first finds the broken one.
    settings = settings_for(fleet_url(servers), vllm_max_retries=1, max_concurrent_pages=1)
    async with VLLMEngine(settings) as engine:
        texts = await run_pages(engine, range(1, 21), sampling_of(settings))
        assert [state.healthy for state in engine.info().endpoints] == [False, True]
    assert texts == [f"page {i}" for i in range(1, 21)]
    assert len(broken.requests) == 1  # only the first page found it broken
    assert servers[1].stub.completed == 20


async def test_a_rejected_page_is_not_moved_to_another_server(servers: list[Server]) -> None:
    """`page_rejected` is the page's fault: another server would answer the same."""
    start(servers, 0.0, 0.0)
    for server in servers:
        server.stub.responder = lambda request: Reply(status=400, message="image has invalid size")
    settings = settings_for(fleet_url(servers), vllm_max_retries=3)
    async with VLLMEngine(settings) as engine:
        with pytest.raises(Exception, match="cannot process this page"):
            await engine.recognize(page(1), sampling_of(settings))
        assert all(state.healthy for state in engine.info().endpoints)
    assert sum(len(server.stub.requests) for server in servers) == 1


async def test_all_servers_down_is_unavailable_with_retry_after() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1,http://127.0.0.1:{free_port()}/v1"
    settings = settings_for(url, vllm_max_retries=2, retry_after_s=7)
    async with VLLMEngine(settings) as engine:
        with pytest.raises(EngineUnavailable, match="none of the 2 vLLM servers") as health:
            await engine.check_health()
        assert health.value.retry_after == 7
        assert "127.0.0.1" not in health.value.message
        with pytest.raises(EngineUnavailable, match="3 attempts") as page_failure:
            await engine.recognize(page(), sampling_of(settings))
        assert page_failure.value.retry_after == 7
        assert not any(state.healthy for state in engine.info().endpoints)


async def test_ready_while_one_server_serves(servers: list[Server]) -> None:
    start(servers, 0.0)
    url = f"http://127.0.0.1:{free_port()}/v1,{servers[0].stub.base_url}"
    async with VLLMEngine(settings_for(url)) as engine:
        await engine.check_health()
        assert [state.healthy for state in engine.info().endpoints] == [False, True]


# --------------------------------------------------------------------------- settings and what is shown


def test_one_url_is_one_endpoint_with_max_concurrent_pages() -> None:
    settings = make_settings(vllm_base_url="http://vllm:8001/v1/", max_concurrent_pages=9)
    assert settings.vllm_base_url == "http://vllm:8001/v1"
    assert settings.vllm_endpoints == [("http://vllm:8001/v1", 9)]


def test_a_fleet_with_a_capacity_override() -> None:
    settings = make_settings(vllm_base_url=" http://a:8001/v1#capacity=32 , http://b:8001/v1/ ", max_concurrent_pages=8)
    assert settings.vllm_endpoints == [("http://a:8001/v1", 32), ("http://b:8001/v1", 8)]


@pytest.mark.parametrize(
    "value", ["", " , ", "vllm:8001/v1", "http://a/v1,b:8001", "http://a/v1#capacity=0", "http://a/v1#cap=3"]
)
def test_bad_fleet_urls_are_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="VLLM_BASE_URL"):
        make_settings(vllm_base_url=value)


def test_info_shows_no_credentials() -> None:
    settings = settings_for("http://user:s3cret@a:8001/v1?token=x,http://b:8001/v1")
    info = VLLMEngine(settings).info()
    assert info.device == "remote (2 vLLM servers)"
    assert "s3cret" not in repr(info)
    engine = VLLMEngine(settings_for("http://user:s3cret@a:8001/v1"))
    assert engine.info().device == "remote (http://a:8001/v1)"


async def test_endpoint_states_list_every_server(servers: list[Server]) -> None:
    start(servers, 0.0, 0.0)
    settings = settings_for(fleet_url(servers), max_concurrent_pages=2)
    async with VLLMEngine(settings) as engine:
        await run_pages(engine, range(1, 5), sampling_of(settings))
        states: list[Any] = list(engine.info().endpoints)
    assert [state.url for state in states] == [server.stub.base_url for server in servers]
    assert sum(state.pages for state in states) == 4
    assert all(state.healthy and state.in_flight == 0 and state.capacity == 2 for state in states)

"""Webhooks: signed, retried on 5xx and connection errors, never on 4xx, resumed after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.jobs import NewJob, SqliteJobStore, WebhookSender, verify
from app.jobs.webhooks import sign
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf
from tests.support.http import free_port
from tests.support.jobs import submit, wait_job
from tests.support.openai_stub import Reply, StubRequest, StubVLLM
from tests.support.server import ServedApp

SECRET = "webhook-test-secret"
SMALL = (200, 260)


class Receiver:
    """A webhook receiver on loopback: records every delivery, answers the next scripted status."""

    def __init__(self) -> None:
        self.statuses: list[int] = []  # answers in order; 200 once exhausted
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._cond = threading.Condition()
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self._cond:
            self.received.append((dict(request.headers), body))
            status = self.statuses.pop(0) if self.statuses else 200
            self._cond.notify_all()
        return Response(status_code=status)

    def wait_for(self, count: int, timeout: float = 20) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= count, timeout), self.received


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with ServedApp(hook.app, lifespan="off") as served:
        yield hook, f"{served.url}/hook"


@pytest.fixture
def jobs_service(vllm_service: ServiceFactory, tmp_path: Path) -> Callable[..., str]:
    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {"webhook_secret": SECRET, "webhook_backoff_s": 0.01, **overrides}
        return vllm_service(jobs_db=tmp_path / "jobs.db", **values)

    return start


def webhook_settled(job: dict[str, Any]) -> bool:
    return job["webhook"] is not None and job["webhook"]["state"] != "pending"


def test_signed_summary_is_delivered(
    stub: StubVLLM, jobs_service: Callable[..., str], receiver: tuple[Receiver, str]
) -> None:
    hook, hook_url = receiver
    url = jobs_service()
    job_id = submit(url, make_pdf(2, SMALL), callback_url=hook_url).json()["id"]
    job = wait_job(url, job_id, webhook_settled)
    assert job["webhook"] == {"state": "delivered", "attempts": 1}
    assert len(hook.received) == 1
    headers, body = hook.received[0]
    # The documented recipe: HMAC-SHA256 of the raw body, hex, prefixed with `sha256=`.
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-lightonocr-signature"], expected)
    assert verify(SECRET, body, headers["x-lightonocr-signature"])
    assert not verify("another-secret", body, headers["x-lightonocr-signature"])
    payload = json.loads(body)
    assert payload["id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["pages_done"] == payload["pages_total"] == 2
    assert payload["timestamp"] == int(headers["x-lightonocr-timestamp"])
    assert "webhook" not in payload
    assert "pages" not in payload
    assert headers["content-type"] == "application/json"


def test_5xx_is_retried_until_delivered(
    stub: StubVLLM, jobs_service: Callable[..., str], receiver: tuple[Receiver, str]
) -> None:
    hook, hook_url = receiver
    hook.statuses = [503, 500]
    url = jobs_service()
    job_id = submit(url, make_pdf(1, SMALL), callback_url=hook_url).json()["id"]
    job = wait_job(url, job_id, webhook_settled)
    assert job["webhook"] == {"state": "delivered", "attempts": 3}
    assert len(hook.received) == 3
    for headers, body in hook.received:  # every attempt is signed afresh
        assert verify(SECRET, body, headers["x-lightonocr-signature"])


def test_4xx_is_never_retried(stub: StubVLLM, jobs_service: Callable[..., str], receiver: tuple[Receiver, str]) -> None:
    hook, hook_url = receiver
    hook.statuses = [410]
    url = jobs_service()
    job_id = submit(url, make_pdf(1, SMALL), callback_url=hook_url).json()["id"]
    job = wait_job(url, job_id, webhook_settled)
    assert job["webhook"] == {"state": "failed", "attempts": 1}
    assert len(hook.received) == 1


def test_connection_errors_are_retried_then_given_up(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    port = free_port()  # nobody listens on it: every attempt is refused
    url = jobs_service(webhook_max_attempts=3)
    job_id = submit(url, make_pdf(1, SMALL), callback_url=f"http://127.0.0.1:{port}/hook").json()["id"]
    job = wait_job(url, job_id, webhook_settled)
    assert job["status"] == "succeeded"
    assert job["webhook"] == {"state": "failed", "attempts": 3}


def test_cancelled_jobs_are_reported(
    stub: StubVLLM, jobs_service: Callable[..., str], receiver: tuple[Receiver, str]
) -> None:
    hook, hook_url = receiver
    release = threading.Event()

    async def hold(request: StubRequest) -> Reply:
        await asyncio.to_thread(release.wait, 20)
        return Reply()

    stub.responder = hold
    try:
        url = jobs_service()
        job_id = submit(url, make_pdf(2, SMALL), callback_url=hook_url).json()["id"]
        stub.wait_until(lambda s: s.in_flight == 2, timeout=20)
        assert httpx.delete(f"{url}/api/jobs/{job_id}").json()["status"] == "cancelled"
        hook.wait_for(1)
    finally:
        release.set()
    assert json.loads(hook.received[0][1])["status"] == "cancelled"


def test_pending_webhooks_are_sent_after_a_restart(
    stub: StubVLLM, vllm_service: ServiceFactory, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """A job finished but its webhook not yet delivered when the process died: the next process sends it."""
    hook, hook_url = receiver
    path = tmp_path / "jobs.db"

    async def leave_pending() -> str:
        store = SqliteJobStore(path, ttl_s=3600, max_bytes=10**6)
        new = NewJob(owner="addr:x", pages=[1], pages_spec=None, password=None, callback_url=hook_url, filename=None)
        record = await store.create(new, make_pdf(1, SMALL))
        assert await store.finish(record.id, "succeeded") is not None
        store.close()
        return record.id

    job_id = asyncio.run(leave_pending())
    url = vllm_service(jobs_db=path, webhook_secret=SECRET)
    hook.wait_for(1)
    headers, body = hook.received[0]
    assert json.loads(body)["id"] == job_id
    assert verify(SECRET, body, headers["x-lightonocr-signature"])
    assert wait_job(url, job_id, webhook_settled)["webhook"] == {"state": "delivered", "attempts": 1}


def test_unsigned_without_a_secret_and_timestamp_is_signed() -> None:
    async def encode() -> None:
        unsigned = WebhookSender(secret=None, max_attempts=1, backoff_s=0, timeout_s=1, clock=lambda: 1700000000.5)
        body, headers = unsigned.encode({"id": "x"})
        await unsigned.aclose()
        assert "X-LightOnOCR-Signature" not in headers
        assert json.loads(body) == {"id": "x", "timestamp": 1700000000}
        signed = WebhookSender(secret=SECRET, max_attempts=1, backoff_s=0, timeout_s=1, clock=lambda: 1700000000)
        body, headers = signed.encode({"id": "x"})
        await signed.aclose()
        assert verify(SECRET, body, headers["X-LightOnOCR-Signature"])
        # Changing the timestamp breaks the signature: it cannot be replayed with a fresh one.
        assert not verify(SECRET, body.replace(b"1700000000", b"1800000000"), headers["X-LightOnOCR-Signature"])

    asyncio.run(encode())


class SteppedClock:
    """A wall clock that moves only when the sender sleeps through its backoff: retries are instant and exact."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_each_retry_has_a_fresh_timestamp_and_a_signature_that_verifies(receiver: tuple[Receiver, str]) -> None:
    hook, hook_url = receiver
    hook.statuses = [503, 500, 502]
    clock = SteppedClock(1_700_000_000)

    async def deliver() -> None:
        sender = WebhookSender(
            secret=SECRET, max_attempts=4, backoff_s=30, timeout_s=10, clock=clock, sleep=clock.sleep
        )
        try:
            delivery = await sender.deliver(hook_url, {"id": "job-1", "status": "succeeded"})
        finally:
            await sender.aclose()
        assert (delivery.delivered, delivery.attempts) == (True, 4)

    asyncio.run(deliver())
    assert clock.slept == [30, 60, 120]  # exponential backoff between the four attempts
    timestamps = []
    for headers, body in hook.received:
        assert verify(SECRET, body, headers["x-lightonocr-signature"])
        payload = json.loads(body)
        assert payload["timestamp"] == int(headers["x-lightonocr-timestamp"])
        assert (payload["id"], payload["status"]) == ("job-1", "succeeded")
        timestamps.append(payload["timestamp"])
    assert timestamps == [1_700_000_000, 1_700_000_030, 1_700_000_090, 1_700_000_210]


def test_the_signature_is_sha256_hmac_of_the_exact_body() -> None:
    body = b'{"id":"x","timestamp":1700000000}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body) == f"sha256={expected}"
    assert verify(SECRET, body, f"sha256={expected}")
    assert not verify(SECRET, body, f"SHA256={expected}")

    async def encode() -> tuple[bytes, dict[str, str]]:
        sender = WebhookSender(secret=SECRET, max_attempts=1, backoff_s=0, timeout_s=1, clock=lambda: 1700000000.9)
        try:
            return sender.encode({"id": "x"})
        finally:
            await sender.aclose()

    sent, headers = asyncio.run(encode())
    assert sent == body  # compact JSON: what a receiver verifies is exactly these bytes
    assert headers == {
        "Content-Type": "application/json",
        "X-LightOnOCR-Timestamp": "1700000000",
        "X-LightOnOCR-Signature": f"sha256={expected}",
    }

"""/api/jobs against a live service on loopback, backed by the vLLM stand-in."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.jobs import JobDetail
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, page_id_of
from tests.support.jobs import Job, submit, wait_job, wait_status
from tests.support.loop import calls_on_the_loop
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

SMALL = (200, 260)  # points: tiny pages render fast


@pytest.fixture
def jobs_service(vllm_service: ServiceFactory, tmp_path: Path) -> Callable[..., str]:
    """A service whose JOBS_DB lives in this test's tmp dir."""

    def start(**overrides: Any) -> str:
        return vllm_service(jobs_db=tmp_path / "jobs.db", **overrides)

    return start


class Gates:
    """Hold the stub's answer for a page until the test opens that page's gate."""

    def __init__(self) -> None:
        self._events: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def __getitem__(self, page: int) -> threading.Event:
        with self._lock:
            return self._events.setdefault(page, threading.Event())

    def open_all(self) -> None:
        with self._lock:
            for event in self._events.values():
                event.set()


@pytest.fixture
def gates() -> Iterator[Gates]:
    held = Gates()
    yield held
    held.open_all()  # never leave a stub handler waiting


def holding(gates: Gates) -> Callable[[StubRequest], Any]:
    async def responder(request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        assert page is not None
        await asyncio.to_thread(gates[page].wait, 20)
        return Reply(text=f"page {page}")

    return responder


def test_a_job_goes_through_its_states(stub: StubVLLM, jobs_service: Callable[..., str], gates: Gates) -> None:
    stub.responder = holding(gates)
    url = jobs_service(jobs_concurrency=1)
    first = submit(url, make_pdf(2, SMALL))
    assert first.status_code == 202
    job_a = first.json()
    assert first.headers["location"] == f"/api/jobs/{job_a['id']}"
    assert job_a["status"] == "queued"
    assert job_a["pages_total"] == 2
    assert job_a["eta_s"] is None
    job_b = submit(url, make_pdf(3, SMALL), pages="3").json()
    assert job_b["pages_total"] == 1
    assert job_b["page_numbers"] == [3]

    stub.wait_until(lambda s: s.in_flight == 2, timeout=20)
    a = wait_status(url, job_a["id"], "running")
    assert a["pages_done"] == 0
    assert a["eta_s"] is None
    assert a["pages"] == []
    assert httpx.get(f"{url}/api/jobs/{job_b['id']}").json()["status"] == "queued"  # JOBS_CONCURRENCY=1
    not_yet = httpx.get(f"{url}/api/jobs/{job_a['id']}/result")
    assert not_yet.status_code == 409
    assert not_yet.json()["error"]["code"] == "job_not_finished"

    gates[1].set()
    a = wait_job(url, job_a["id"], lambda job: job["pages_done"] == 1)
    assert a["status"] == "running"
    assert a["eta_s"] is not None
    assert a["eta_s"] >= 0
    assert [page["page"] for page in a["pages"]] == [1]
    assert a["pages"][0]["text"] == "page 1"

    gates[2].set()
    a = wait_status(url, job_a["id"], "succeeded")
    assert a["pages_done"] == 2
    assert a["eta_s"] is None
    assert a["finished_at"]
    assert a["expires_at"]
    assert [page["page"] for page in a["pages"]] == [1, 2]
    b = wait_status(url, job_b["id"], "running")
    gates[3].set()
    b = wait_status(url, job_b["id"], "succeeded")
    assert [page["text"] for page in b["pages"]] == ["page 3"]
    listed = httpx.get(f"{url}/api/jobs").json()["jobs"]
    assert [job["id"] for job in listed] == [job_b["id"], job_a["id"]]
    assert "pages" not in listed[0]  # the listing carries summaries only
    assert stub.violations == []


def test_partial_then_failed(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    failing = {2}
    stub.responder = lambda r: Reply(status=400) if page_id_of(r.image) in failing else Reply()
    url = jobs_service()
    partial = wait_status(url, submit(url, make_pdf(3, SMALL)).json()["id"], "partial", "succeeded", "failed")
    assert partial["status"] == "partial"
    result = httpx.get(f"{url}/api/jobs/{partial['id']}/result").json()
    assert result["status"] == "partial"
    assert result["failed_pages"] == [2]
    assert result["text"] == "page 1\n\npage 3"

    failing.update({1, 3})
    failed = wait_status(url, submit(url, make_pdf(3, SMALL)).json()["id"], "partial", "succeeded", "failed")
    assert failed["status"] == "failed"
    # Every page failed the same way: the job ends with the pages' own error, as /api/inference answers.
    inference = httpx.post(f"{url}/api/inference", files={"file": ("a.pdf", make_pdf(3, SMALL))}, timeout=30)
    assert inference.status_code == 502
    assert failed["error"]["code"] == inference.json()["error"]["code"] == "page_rejected"
    assert failed["error"]["details"] == inference.json()["error"]["details"]
    assert failed["error"]["details"]["upstream_status"] == 400

    failing.remove(3)
    mixed = wait_status(url, submit(url, make_pdf(3, SMALL)).json()["id"], "partial", "succeeded", "failed")
    assert mixed["error"]["code"] == "document_failed"
    assert mixed["error"]["details"]["failed_pages"] == [1, 2]
    refused = httpx.get(f"{url}/api/jobs/{failed['id']}/result")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "job_failed"


def test_cancel_keeps_finished_pages_and_never_sends_the_rest(
    stub: StubVLLM, jobs_service: Callable[..., str], gates: Gates
) -> None:
    """The first page to arrive is answered, the others are held; pages never started never reach the stub."""
    first = threading.Event()

    async def responder(request: StubRequest) -> Reply:
        if not first.is_set():
            first.set()
            return Reply(text="first")
        await asyncio.to_thread(gates[0].wait, 20)
        return Reply(text="late")

    stub.responder = responder
    url = jobs_service(max_concurrent_pages=2)
    job_id = submit(url, make_pdf(6, SMALL)).json()["id"]
    wait_job(url, job_id, lambda job: job["pages_done"] == 1)
    stub.wait_until(lambda s: s.in_flight == 2, timeout=20)

    cancelled = httpx.delete(f"{url}/api/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    stub.wait_until(lambda s: s.cancelled == 2, timeout=20)  # the two in flight were aborted
    gates.open_all()
    assert len(stub.requests) == 3  # 1 answered + 2 aborted; 3 pages never sent
    job = httpx.get(f"{url}/api/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["pages_done"] == 1
    assert job["pages"][0]["text"] == "first"
    for fmt in ("json", "md", "txt"):  # a cancelled job has no result, whatever pages it finished
        result = httpx.get(f"{url}/api/jobs/{job_id}/result", params={"format": fmt})
        assert result.status_code == 409
        assert result.json()["error"]["code"] == "job_cancelled"
        assert result.json()["error"]["details"] == {"pages_done": 1, "pages_total": 6}
    again = httpx.delete(f"{url}/api/jobs/{job_id}")  # idempotent
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    assert len(stub.requests) == 3


def test_a_job_cancelled_before_any_page_has_no_result(
    stub: StubVLLM, jobs_service: Callable[..., str], gates: Gates
) -> None:
    stub.responder = holding(gates)
    url = jobs_service()
    job_id = submit(url, make_pdf(3, SMALL)).json()["id"]
    stub.wait_until(lambda s: s.in_flight == 3, timeout=20)
    assert httpx.delete(f"{url}/api/jobs/{job_id}").json()["status"] == "cancelled"
    result = httpx.get(f"{url}/api/jobs/{job_id}/result")
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "job_cancelled"
    assert result.json()["error"]["details"] == {"pages_done": 0, "pages_total": 3}


def test_limits_apply_at_submit(stub: StubVLLM, jobs_service: Callable[..., str], gates: Gates) -> None:
    url = jobs_service(max_pages=2, key_max_pages_in_flight=2)
    cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        ({"file": ("a.pdf", make_pdf(3, SMALL))}, {}, 422, "too_many_pages"),
        ({"file": ("a.pdf", make_pdf(3, SMALL))}, {"pages": "7"}, 422, "invalid_pages"),
        ({"file": ("a.txt", b"hello")}, {}, 415, "unsupported_media_type"),
        ({"file": ("a.pdf", make_pdf(1, SMALL, password="pw"))}, {}, 422, "password_required"),
        ({"file": ("a.pdf", make_pdf(1, SMALL, password="pw"))}, {"password": "no"}, 422, "wrong_password"),
        ({"file": ("a.pdf", make_pdf(1, SMALL))}, {"callback_url": "ftp://example.com/x"}, 422,
         "invalid_callback_url"),
        ({"file": ("a.pdf", make_pdf(1, SMALL))}, {"callback_url": "hook"}, 422, "invalid_callback_url"),
        ({"other": ("a.pdf", b"x")}, {}, 422, "missing_file"),
    ]  # fmt: skip
    for files, data, status, code in cases:
        response = httpx.post(f"{url}/api/jobs", files=files, data=data, timeout=30)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), data
    assert httpx.get(f"{url}/api/jobs").json()["jobs"] == []

    # Admission: this client already has KEY_MAX_PAGES_IN_FLIGHT pages running.
    stub.responder = holding(gates)
    running = submit(url, make_pdf(2, SMALL)).json()["id"]
    stub.wait_until(lambda s: s.in_flight == 2, timeout=20)
    refused = submit(url, make_pdf(1, SMALL))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_pages_in_flight"
    assert "retry-after" in refused.headers
    httpx.delete(f"{url}/api/jobs/{running}")


def test_a_retried_submission_with_an_idempotency_key_gets_the_first_job(
    stub: StubVLLM, jobs_service: Callable[..., str]
) -> None:
    """A client that lost the 202 (a replica died, a proxy timed out) retries with the same Idempotency-Key:
    it gets the job the first attempt made, not a second job, and the retry is not charged to its rate."""
    url = jobs_service(rate_limit_pages_per_min=2)
    document = make_pdf(2, SMALL)
    first = submit(url, document, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    retried = submit(url, document, headers={"Idempotency-Key": "order-42"})
    assert retried.status_code == 202, retried.text  # not 429: the bucket held 2 pages, both spent by the first
    assert retried.json()["id"] == first.json()["id"]
    assert retried.headers["location"] == first.headers["location"]
    assert retried.headers["idempotent-replayed"] == "true"
    assert [job["id"] for job in httpx.get(f"{url}/api/jobs").json()["jobs"]] == [first.json()["id"]]
    assert wait_job(url, first.json()["id"], lambda job: job["status"] == "succeeded")["pages_done"] == 2
    assert stub.completed == 2  # each page computed once

    reused = submit(url, make_pdf(1, SMALL), headers={"Idempotency-Key": "order-42"})
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert reused.json()["error"]["details"] == {"job_id": first.json()["id"]}
    other_pages = submit(url, document, pages="1", headers={"Idempotency-Key": "order-42"})
    assert other_pages.json()["error"]["code"] == "idempotency_key_reused"
    for bad in (b"", b"x" * 256, "caf\u00e9".encode()):
        refused = httpx.post(f"{url}/api/jobs", files={"file": ("a.pdf", document)},
                             headers={b"Idempotency-Key": bad}, timeout=30)  # fmt: skip
        assert refused.status_code == 422, bad
        assert refused.json()["error"]["code"] == "invalid_idempotency_key"


def test_encrypted_pdf_and_page_images(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    """The stored password reopens the PDF; /image is byte for byte the PNG the stub received."""
    seen: dict[int, str] = {}

    def responder(request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        assert page is not None
        seen[page] = request.sha256
        return Reply(text=f"page {page}")

    stub.responder = responder
    url = jobs_service()
    job_id = submit(url, make_pdf(3, (300, 400), password="pw"), password="pw", pages="2-3").json()["id"]
    wait_status(url, job_id, "succeeded")
    for page in (2, 3):
        image = httpx.get(f"{url}/api/jobs/{job_id}/pages/{page}/image")
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert hashlib.sha256(image.content).hexdigest() == seen[page]
    outside = httpx.get(f"{url}/api/jobs/{job_id}/pages/1/image")  # in the document, not in the job
    assert outside.status_code == 404
    assert outside.json()["error"]["code"] == "page_not_found"


def test_result_formats(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    texts = {
        1: "# Title\n\nSome **bold** text with $x^2$ &amp; more.\n\n| a | b |\n|---|---|\n| 1 | 2 |",
        2: "<table><tr><th>h1</th><th>h2</th></tr><tr><td>c &amp; d</td><td>e</td></tr></table>\n\n- one\n- two",
    }
    stub.responder = lambda request: Reply(text=texts[page_id_of(request.image) or 0])
    url = jobs_service()
    job_id = submit(url, make_pdf(2, SMALL)).json()["id"]
    wait_status(url, job_id, "succeeded")
    base = f"{url}/api/jobs/{job_id}/result"

    as_json = httpx.get(base).json()
    inference = httpx.post(f"{url}/api/inference", files={"file": ("a.pdf", make_pdf(2, SMALL))}, timeout=30).json()
    for document in (as_json, inference):
        for page in document["pages"]:
            page.pop("seconds")
    assert as_json == inference

    markdown = httpx.get(base, params={"format": "md"})
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text == texts[1] + "\n\n" + texts[2]

    text = httpx.get(base, params={"format": "txt"})
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == (
        "Title\n\nSome bold text with $x^2$ & more.\n\na\tb\n1\t2\n\nh1\th2\nc & d\te\n\n- one\n- two\n"
    )
    bad = httpx.get(base, params={"format": "xml"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "validation_error"
    for path in ("", "/result", "/pages/1/image"):
        unknown = httpx.get(f"{url}/api/jobs/nope{path}")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "job_not_found"
    assert httpx.delete(f"{url}/api/jobs/nope").status_code == 404


def test_storage_bound(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    document = make_pdf(1, SMALL)
    url = jobs_service(jobs_max_bytes=len(document) + 10)
    assert submit(url, document).status_code == 202
    refused = submit(url, make_pdf(1, SMALL))
    assert refused.status_code == 507
    assert refused.json()["error"]["code"] == "jobs_storage_full"
    assert refused.json()["error"]["details"]["max_bytes"] == len(document) + 10


def test_finished_jobs_expire(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    url = jobs_service(jobs_ttl_hours=1 / 3600)  # one second
    job_id = submit(url, make_pdf(1, SMALL)).json()["id"]

    def gone() -> bool:
        return httpx.get(f"{url}/api/jobs/{job_id}").status_code == 404

    deadline_polls = 1500
    while not gone():
        deadline_polls -= 1
        assert deadline_polls > 0, "the job never expired"
        threading.Event().wait(0.02)
    expired = httpx.get(f"{url}/api/jobs/{job_id}/result")
    assert expired.status_code == 404
    assert expired.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{url}/api/jobs").json()["jobs"] == []


def test_listing_and_access_are_per_key(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    url = jobs_service(api_keys="key-a,key-b")
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    job_a = submit(url, make_pdf(1, SMALL), headers=a).json()["id"]
    job_b = submit(url, make_pdf(1, SMALL), headers=b).json()["id"]
    wait_status(url, job_a, "succeeded", headers=a)
    assert [job["id"] for job in httpx.get(f"{url}/api/jobs", headers=a).json()["jobs"]] == [job_a]
    assert [job["id"] for job in httpx.get(f"{url}/api/jobs", headers=b).json()["jobs"]] == [job_b]
    for method, path in (("GET", ""), ("GET", "/result"), ("GET", "/pages/1/image"), ("DELETE", "")):
        other: httpx.Response = httpx.request(method, f"{url}/api/jobs/{job_b}{path}", headers=a)
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{url}/api/jobs").status_code == 401
    finished: Job = wait_status(url, job_b, "succeeded", headers=b)
    assert finished["pages_done"] == 1


def test_purge_deletes_a_job_for_good(stub: StubVLLM, jobs_service: Callable[..., str], gates: Gates) -> None:
    url = jobs_service()
    done = submit(url, make_pdf(2, SMALL)).json()["id"]
    wait_status(url, done, "succeeded")
    outside = httpx.get(f"{url}/api/jobs/{done}/pages/3/image")
    assert outside.status_code == 404
    assert outside.json()["error"]["code"] == "page_not_found"
    assert outside.json()["error"]["details"]["pages"] == [1, 2]
    purged = httpx.delete(f"{url}/api/jobs/{done}", params={"purge": "true"})
    assert purged.status_code == 200
    assert purged.json()["status"] == "succeeded"  # its last summary
    for path in ("", "/result", "/pages/1/image"):
        assert httpx.get(f"{url}/api/jobs/{done}{path}").json()["error"]["code"] == "job_not_found"
    assert httpx.delete(f"{url}/api/jobs/{done}", params={"purge": "true"}).status_code == 404

    stub.responder = holding(gates)
    running = submit(url, make_pdf(2, SMALL)).json()["id"]
    stub.wait_until(lambda s: s.in_flight == 2, timeout=20)
    purged = httpx.delete(f"{url}/api/jobs/{running}", params={"purge": "true"})
    assert purged.json()["status"] == "cancelled"  # cancelled first: its pages were aborted
    stub.wait_until(lambda s: s.cancelled == 2, timeout=20)
    assert httpx.get(f"{url}/api/jobs/{running}").status_code == 404
    assert httpx.get(f"{url}/api/jobs").json()["jobs"] == []


def test_a_job_blocked_on_an_unreachable_engine_says_so(stub: StubVLLM, jobs_service: Callable[..., str]) -> None:
    down = threading.Event()
    down.set()
    stub.responder = lambda request: Reply(drop_connection=True) if down.is_set() else Reply(text="back")
    url = jobs_service(retry_after_s=1, vllm_max_retries=0)
    job_id = submit(url, make_pdf(2, SMALL)).json()["id"]
    job = wait_job(url, job_id, lambda job: job["waiting"] is not None)
    assert job["status"] in ("queued", "running")
    assert job["waiting"]["code"] == "engine_unavailable"
    assert job["waiting"]["since"] is not None
    down.clear()
    done = wait_status(url, job_id, "succeeded")
    assert done["waiting"] is None
    assert [page["text"] for page in done["pages"]] == ["back", "back"]


def test_a_job_with_its_pages_is_encoded_off_the_event_loop(
    stub: StubVLLM, jobs_service: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long job's detail carries every finished page: encoding it on the loop would stall every other request."""
    url = jobs_service()
    job_id = submit(url, make_pdf(2, SMALL)).json()["id"]
    wait_status(url, job_id, "succeeded")
    on_loop = calls_on_the_loop(monkeypatch, JobDetail, "model_dump_json")
    response = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    assert [page["page"] for page in response.json()["pages"]] == [1, 2]
    assert on_loop == [False]

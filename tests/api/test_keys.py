"""API keys, per-key limits, rate limiting and CORS, over HTTP on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServiceFactory
from tests.support.documents import make_png, small_pdf
from tests.support.gate import Gate
from tests.support.http import ok, post
from tests.support.openai_stub import Reply, StubVLLM

KEY_A = "alpha-0123456789abcdef"
KEY_B = "bravo-fedcba9876543210"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert error["message"].startswith(reason)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


# --------------------------------------------------------------------------- keys


PROTECTED = [("GET", "/info"), ("GET", "/metrics"), ("POST", "/docs")]


def test_every_route_but_the_probes_and_the_docs_needs_a_key(vllm_service: ServiceFactory) -> None:
    url = vllm_service(api_keys=[KEY_A, KEY_B])
    for path in ("/health", "/ready", "/docs", "/openapi.json"):  # the docs hold no data (tests/api/test_docs.py)
        assert httpx.get(url + path).status_code == 200
    for method, path in PROTECTED:
        assert_unauthorized(httpx.request(method, url + path), "missing")
        assert_unauthorized(httpx.request(method, url + path, headers=auth("wrong")), "invalid")
        assert httpx.request(method, url + path, headers=auth(KEY_B)).status_code in (200, 405), path
    png = make_png(300, 300, page_id=1)
    assert_unauthorized(post(url, png, name="p.png"), "missing")
    assert_unauthorized(post(url, png, headers=auth(KEY_A + "x"), name="p.png"), "invalid")
    assert_unauthorized(post(url, png, headers=auth(KEY_A[:-1]), name="p.png"), "invalid")
    assert_unauthorized(post(url, png, headers={"Authorization": f"Basic {KEY_A}"}, name="p.png"), "invalid")
    assert_unauthorized(post(url, png, headers={"Authorization": "Bearer"}, name="p.png"), "invalid")
    assert ok(post(url, png, headers=auth(KEY_A), name="p.png"))["text"] == "page 1"
    assert ok(post(url, png, headers={"Authorization": f"bearer  {KEY_B}"}, name="p.png"))["text"] == "page 1"


def test_unknown_routes_need_a_key_before_saying_404(vllm_service: ServiceFactory) -> None:
    url = vllm_service(api_keys=[KEY_A])
    assert_unauthorized(httpx.get(url + "/nowhere"), "missing")
    response = httpx.get(url + "/nowhere", headers=auth(KEY_A))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_no_keys_means_open(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    assert httpx.get(url + "/info").status_code == 200
    assert ok(post(url, make_png(300, 300, page_id=2), name="p.png"))["text"] == "page 2"


def test_keys_file_with_comments_and_blank_lines(vllm_service: ServiceFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team alpha\n\n  {KEY_A}  \n   # {KEY_B} is revoked\n\n", encoding="utf-8")
    url = vllm_service(api_keys_file=keys, api_keys=["env-key-1"])
    assert httpx.get(url + "/info", headers=auth(KEY_A)).status_code == 200
    assert httpx.get(url + "/info", headers=auth("env-key-1")).status_code == 200  # both sources count
    assert_unauthorized(httpx.get(url + "/info", headers=auth(KEY_B)), "invalid")
    assert_unauthorized(httpx.get(url + "/info", headers=auth("# team alpha")), "invalid")


def test_keys_never_reach_the_logs(
    vllm_service: ServiceFactory, stub: StubVLLM, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = "bad-secret-7f3a9c1e55"
    url = vllm_service(api_keys=[KEY_A])
    caplog.set_level(logging.DEBUG)
    png = make_png(300, 300, page_id=3)
    assert post(url, png, headers=auth(bad), name="p.png").status_code == 401
    assert post(url, png, headers=auth(KEY_A), name="p.png").status_code == 200
    stub.responder = lambda request: Reply(status=400, message="rejected")
    assert post(url, png, headers=auth(KEY_A), name="p.png").status_code == 502  # error paths log too
    assert httpx.get(url + "/info", headers=auth(bad)).status_code == 401

    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    out, err = capfd.readouterr()
    assert caplog.records, "the requests were logged"
    for secret in (bad, KEY_A):
        assert secret not in logged
        assert secret not in out + err


# --------------------------------------------------------------------------- per-key limits


def test_key_flooding_its_limit_does_not_starve_another(
    vllm_service: ServiceFactory, stub: StubVLLM, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(hold={1, 2})  # key A's document pages; B's page (50) is answered at once
    stub.responder = gate
    try:
        url = vllm_service(api_keys=[KEY_A, KEY_B], key_max_pages_in_flight=2, max_concurrent_pages=4)
        held = pool.submit(post, url, small_pdf(2), headers=auth(KEY_A))
        stub.wait_until(lambda s: s.in_flight == 2)

        refused = post(url, make_png(300, 300, page_id=60), headers=auth(KEY_A), name="p.png")
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "5"
        error = refused.json()["error"]
        assert error["code"] == "too_many_pages_in_flight"
        assert error["details"] == {"pages_in_flight": 2}

        served = ok(post(url, make_png(300, 300, page_id=50), headers=auth(KEY_B), name="p.png"))
        assert served["text"] == "page 50"
        assert stub.in_flight == 2  # A's pages are still held while B was served
        assert not held.done()
    finally:
        gate.open()
    assert ok(held.result(timeout=30))["text"] == "page 1\n\npage 2"
    # A's pages are done: A may send again.
    assert ok(post(url, make_png(300, 300, page_id=60), headers=auth(KEY_A), name="p.png"))["text"] == "page 60"
    assert 60 in gate.seen


def test_rate_limit_answers_429_with_retry_after(vllm_service: ServiceFactory) -> None:
    url = vllm_service(api_keys=[KEY_A, KEY_B], rate_limit_pages_per_min=3)
    ok(post(url, small_pdf(3), headers=auth(KEY_A)))
    refused = post(url, make_png(300, 300, page_id=1), headers=auth(KEY_A), name="p.png")
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 20  # one page every 20 s
    error = refused.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"] == {"pages_per_minute": 3}
    assert ok(post(url, make_png(300, 300, page_id=1), headers=auth(KEY_B), name="p.png"))["text"] == "page 1"


# --------------------------------------------------------------------------- CORS


ORIGIN = "https://ocr.example.com"


def preflight(url: str, origin: str = ORIGIN) -> httpx.Response:
    return httpx.options(
        url + "/api/inference",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )


def test_cors_origins_allow_preflight_and_responses(vllm_service: ServiceFactory) -> None:
    url = vllm_service(cors_origins=[ORIGIN], api_keys=[KEY_A])
    response = preflight(url)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()

    answered = post(url, make_png(300, 300, page_id=4), headers={**auth(KEY_A), "Origin": ORIGIN}, name="p.png")
    assert ok(answered)["text"] == "page 4"
    assert answered.headers["Access-Control-Allow-Origin"] == ORIGIN
    # A 401 is readable by the page, so it can ask for a key.
    refused = httpx.get(url + "/info", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    # Other origins get no grant.
    assert "Access-Control-Allow-Origin" not in preflight(url, "https://evil.example").headers


def test_no_cors_headers_by_default(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    assert "Access-Control-Allow-Origin" not in preflight(url).headers
    response = httpx.get(url + "/info", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers

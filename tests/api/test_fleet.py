"""The service over HTTP with a fleet of vLLM stand-ins: pages spread, /info, /metrics, /ready, all down."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.main import create_app
from tests.api.test_errors import assert_error
from tests.conftest import make_settings
from tests.support.documents import make_pdf
from tests.support.http import ok, post
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp


@pytest.fixture
def stubs() -> Iterator[list[StubVLLM]]:
    started = [StubVLLM().start(), StubVLLM().start()]
    yield started
    for stub in started:
        stub.stop()


@pytest.fixture
def url(stubs: list[StubVLLM]) -> Iterator[str]:
    # Credentials in a URL go to the server, never to /info, /metrics or a client's error.
    fleet = ",".join(stub.base_url.replace("http://", "http://user:s3cret@") for stub in stubs)
    settings = make_settings(
        model_source="vllm",
        vllm_base_url=fleet,
        vllm_retry_backoff_s=0.01,
        vllm_max_retries=1,
        retry_after_s=7,
        max_concurrent_pages=2,
    )
    with ServedApp(create_app(settings)) as served:
        yield served.url


def test_pages_go_to_both_servers_and_info_and_metrics_show_them(url: str, stubs: list[StubVLLM]) -> None:
    body = ok(post(url, make_pdf(8, page_size_pt=(216, 288))))
    assert [page["status"] for page in body["pages"]] == ["ok"] * 8
    assert all(stub.completed > 0 for stub in stubs)  # both took pages

    info = ok(httpx.get(f"{url}/info"))
    assert info["device"] == "remote (2 vLLM servers)"
    assert [(e["url"], e["state"], e["capacity"]) for e in info["endpoints"]] == [
        (stub.base_url, "healthy", 2) for stub in stubs
    ]
    assert sum(e["pages"] for e in info["endpoints"]) == 8

    metrics = httpx.get(f"{url}/metrics").text
    for stub in stubs:
        assert f'lightonocr_endpoint_healthy{{endpoint="{stub.base_url}"}} 1.0' in metrics
        assert f'lightonocr_endpoint_pages_total{{endpoint="{stub.base_url}"}} {stub.completed}.0' in metrics
        assert f'lightonocr_endpoint_pages_in_flight{{endpoint="{stub.base_url}"}} 0.0' in metrics
        assert f'lightonocr_endpoint_errors_total{{endpoint="{stub.base_url}"}} 0.0' in metrics
    assert "s3cret" not in metrics
    assert "s3cret" not in str(info)


def test_ready_while_one_server_serves_and_503_when_none(url: str, stubs: list[StubVLLM]) -> None:
    assert httpx.get(f"{url}/ready").status_code == 200
    stubs[0].stop()
    assert httpx.get(f"{url}/ready").status_code == 200
    body = ok(post(url, make_pdf(3, page_size_pt=(216, 288))))
    assert [page["status"] for page in body["pages"]] == ["ok"] * 3
    states = [e["state"] for e in ok(httpx.get(f"{url}/info"))["endpoints"]]
    assert states == ["down", "healthy"]
    assert 'lightonocr_endpoint_healthy{endpoint="' + stubs[0].base_url + '"} 0.0' in httpx.get(f"{url}/metrics").text

    stubs[1].stop()
    ready = httpx.get(f"{url}/ready")
    body = assert_error(ready, 503, "engine_unavailable")
    assert ready.headers["retry-after"] == "7"
    assert "s3cret" not in ready.text
    assert "127.0.0.1" not in body["error"]["message"]
    response = post(url, make_pdf(2, page_size_pt=(216, 288)))
    assert_error(response, 503, "engine_unavailable")
    assert response.headers["retry-after"] == "7"
    assert httpx.get(f"{url}/health").status_code == 200

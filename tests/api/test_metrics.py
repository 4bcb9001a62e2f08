"""/metrics after known workloads (exact counts), and the completeness of the OpenAPI docs for operators."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.api.openapi import error_codes
from app.main import create_app
from tests.conftest import ServiceFactory, make_settings
from tests.support.documents import make_pdf, page_id_of
from tests.support.http import post
from tests.support.openai_stub import Reply, StubRequest, StubVLLM, describe

PAGE_PT = (144, 180)
LOOP = "\n".join(["| 1 | total | 1 |"] * 30)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **kwargs: Any) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def test_counts_after_a_known_workload(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    pdf = make_pdf(3, PAGE_PT)
    for _ in range(2):
        assert post(url, pdf).status_code == 200
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200

    samples = scrape(url)
    assert value(samples, "lightonocr_pages_total", status="ok") == 6
    for status in ("retried", "truncated", "repetitive", "failed"):
        assert value(samples, "lightonocr_pages_total", status=status) == 0
    assert labelled(samples, "lightonocr_requests_total") == [
        {"method": "POST", "route": "/api/inference", "status": "200"}
    ]
    assert value(samples, "lightonocr_requests_total", method="POST", route="/api/inference", status="200") == 2
    assert value(samples, "lightonocr_request_duration_seconds_count", route="/api/inference") == 2
    assert value(samples, "lightonocr_page_duration_seconds_count") == 6
    assert value(samples, "lightonocr_page_tokens_count") == 6
    assert value(samples, "lightonocr_page_tokens_sum") == 12  # the stub answers "page N": two words each
    assert value(samples, "lightonocr_page_retries_total") == 0
    assert value(samples, "lightonocr_repetitions_total") == 0
    assert value(samples, "lightonocr_received_bytes_total") >= 2 * len(pdf)
    assert value(samples, "lightonocr_sent_bytes_total") > 0
    for gauge in ("lightonocr_queued_pages", "lightonocr_engine_pages_in_flight", "lightonocr_engine_pages_waiting"):
        assert value(samples, gauge) == 0


def test_retries_repetitions_and_failed_pages(stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    """Page 2 loops once then reads clean; page 3 always fails."""

    def responder(request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        if page == 2 and request.attempt == 1:
            return Reply(text=LOOP)
        if page == 3:
            return Reply(status=400, message="bad page")
        return Reply(text=describe(request.image))

    stub.responder = responder
    url = vllm_service(vllm_max_retries=0)
    body = post(url, make_pdf(3, PAGE_PT)).json()
    assert [page["status"] for page in body["pages"]] == ["ok", "retried", "failed"]

    samples = scrape(url)
    expected = {"ok": 1, "retried": 1, "truncated": 0, "repetitive": 0, "failed": 1}
    for status, count in expected.items():
        assert value(samples, "lightonocr_pages_total", status=status) == count
    assert value(samples, "lightonocr_page_retries_total") == 1
    assert value(samples, "lightonocr_repetitions_total") == 1
    assert value(samples, "lightonocr_page_tokens_count") == 2  # failed pages have no tokens to count


def test_errors_are_counted_by_route_template(vllm_service: ServiceFactory) -> None:
    """A 401 is answered before routing and a 404 matches nothing: labels stay bounded either way."""
    url = vllm_service(api_keys="secret-key")
    auth = {"Authorization": "Bearer secret-key"}
    assert post(url, b"%PDF-1.4 broken", headers=auth).status_code == 422
    assert post(url, make_pdf(1, PAGE_PT)).status_code == 401
    assert httpx.get(f"{url}/no/such/route/123", headers=auth).status_code == 404
    assert httpx.get(f"{url}/metrics").status_code == 401

    samples = scrape(url, headers=auth)
    assert sorted(labelled(samples, "lightonocr_requests_total"), key=lambda labels: labels["status"]) == [
        {"method": "POST", "route": "/api/inference", "status": "401"},
        {"method": "GET", "route": "<unmatched>", "status": "404"},
        {"method": "POST", "route": "/api/inference", "status": "422"},
    ]


# -- OpenAPI: what operators and client authors read -------------------------------------


def _gaps(schema: dict[str, Any]) -> list[str]:
    """Everything /docs leaves unexplained: operations, error responses, fields."""
    gaps = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            gaps += [f"{where}: no {key}" for key in ("summary", "description") if not operation.get(key)]
            for status, response in operation["responses"].items():
                if status.startswith(("2", "3")):
                    continue
                content = response.get("content", {}).get("application/json", {})
                if content.get("schema") != {"$ref": "#/components/schemas/ErrorResponse"}:
                    gaps.append(f"{where} {status}: not the error model")
                elif not content.get("example"):
                    gaps.append(f"{where} {status}: no example")
    for name, component in schema["components"]["schemas"].items():
        if name in ("ValidationError", "HTTPValidationError"):
            continue  # FastAPI's own; never sent (validation failures use the error model)
        for field, spec in component.get("properties", {}).items():
            if not spec.get("description"):
                gaps.append(f"schema {name}.{field}: no description")
    return gaps


def test_openapi_is_complete() -> None:
    schema = create_app(make_settings()).openapi()
    description = schema["info"]["description"]
    for status, code in error_codes():
        assert f"| {status} | `{code}` |" in description
    assert _gaps(schema) == []
    assert schema["components"]["schemas"]["DocumentResult"].get("examples")
    assert "/metrics" in schema["paths"]

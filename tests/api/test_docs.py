"""/docs: Swagger UI from the package (renders offline), open without a key; calls made from it still need one."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import ServiceFactory

KEY = "docs-test-key-0123456789"
REFERENCE = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def references(html: str) -> list[str]:
    return REFERENCE.findall(html)


@pytest.mark.parametrize("keys", [[], [KEY]])
def test_docs_page_and_assets_are_served_here_without_a_key(vllm_service: ServiceFactory, keys: list[str]) -> None:
    url = vllm_service(api_keys=keys)
    page = httpx.get(f"{url}/docs")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text
    assert "https://" not in page.text  # no CDN: a closed network still gets the page
    found = references(page.text)
    assert "/openapi.json" in found
    assets = [ref for ref in found if ref.startswith("/static/")]
    assert {ref.rsplit(".", 1)[-1] for ref in assets} == {"js", "css", "png"}
    for ref in assets:
        asset = httpx.get(url + ref)
        assert asset.status_code == 200, ref
        assert asset.headers["content-type"].startswith(CONTENT_TYPES["." + ref.rsplit(".", 1)[-1]]), ref
    schema = httpx.get(f"{url}/openapi.json")
    assert schema.status_code == 200
    assert "/api/inference" in schema.json()["paths"]


def test_with_keys_the_schema_declares_the_bearer_key_and_calls_still_need_it(vllm_service: ServiceFactory) -> None:
    url = vllm_service(api_keys=[KEY])
    schema = httpx.get(f"{url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of API_KEYS / API_KEYS_FILE.",
    }
    assert schema["security"] == [{"ApiKey": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/api/inference"]["post"]  # the global requirement applies
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.post(f"{url}/docs").status_code == 401  # only reading the docs is open


def test_without_keys_no_security_scheme(vllm_service: ServiceFactory) -> None:
    schema = httpx.get(f"{vllm_service()}/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "security" not in schema


def test_redoc_is_gone(vllm_service: ServiceFactory) -> None:
    """ReDoc loads from a CDN and Google Fonts: not served rather than blank offline."""
    assert httpx.get(f"{vllm_service()}/redoc").status_code == 404

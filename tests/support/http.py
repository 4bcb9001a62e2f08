"""HTTP helpers shared by the API tests: post a document, read a 200 body, pick a free port."""

from __future__ import annotations

import socket
from typing import Any

import httpx


def post(
    url: str,
    content: bytes,
    name: str = "doc.pdf",
    *,
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
    **kwargs: Any,
) -> httpx.Response:
    """POST `content` as the `file` of /api/inference (the type is read from the bytes, not the name)."""
    files = {"file": (name, content)}
    return httpx.post(f"{url}/api/inference", files=files, data=data, headers=headers, timeout=timeout, **kwargs)


def ok(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 200, or a failure showing what came instead."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def free_port() -> int:
    """A loopback port nobody listens on now (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

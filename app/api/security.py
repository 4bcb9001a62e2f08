"""API keys: `Authorization: Bearer <key>` on every route but the probes, the web page's static shell and the API docs.

Keys are compared in constant time against every configured key, and never
logged: requests are attributed to `key:<sha256 prefix>` for per-client limits.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_json
from app.errors import Unauthorized

OPEN_PATHS = frozenset({"/health", "/ready"})
# The web page and its assets load without a key so the page can ask for one; they hold
# no data. Everything the page calls (/api/inference, /web/render) still needs the key.
# The same goes for the API docs: /docs (Swagger UI, its assets under /static) and the
# schema it reads describe the API, and every call made from them needs the key.
OPEN_PAGE_PATHS = frozenset({"/", "/docs", "/openapi.json"})
OPEN_PAGE_PREFIX = "/static/"


def is_open(path: str, method: str | None) -> bool:
    if path in OPEN_PATHS or method == "OPTIONS":
        return True
    return method in ("GET", "HEAD") and (path in OPEN_PAGE_PATHS or path.startswith(OPEN_PAGE_PREFIX))


def key_id(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def client_id(connection: HTTPConnection) -> str:
    """Who a request counts against: its API key, else its address."""
    identity = connection.scope.get("state", {}).get("client_id")
    if isinstance(identity, str):
        return identity
    return f"addr:{connection.client.host}" if connection.client else "anonymous"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: frozenset[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]

    def _match(self, presented: str) -> bytes | None:
        candidate = presented.encode()
        found: bytes | None = None
        for key in self._keys:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(candidate, key):
                found = key
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"], scope.get("method")):
            await self.app(scope, receive, send)
            return
        header = HTTPConnection(scope).headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        key = self._match(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            reason = "missing" if not header else "invalid"
            response = error_json(Unauthorized(f"{reason} API key: send `Authorization: Bearer <key>`"))
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["client_id"] = key_id(key.decode())
        await self.app(scope, receive, send)

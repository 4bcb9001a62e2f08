"""Signed webhook delivery: POST a finished job's summary to its callback_url.

The body is JSON; `X-LightOnOCR-Signature: sha256=<hex>` is the HMAC-SHA256 of
the raw body bytes keyed with WEBHOOK_SECRET. The body carries `timestamp`
(also sent as `X-LightOnOCR-Timestamp`), so a receiver can refuse replays and
the timestamp is covered by the signature. Connection errors and 5xx are
retried with exponential backoff; a 4xx is the receiver's final answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.errors import InvalidCallbackUrl
from app.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-LightOnOCR-Signature"
TIMESTAMP_HEADER = "X-LightOnOCR-Timestamp"
MAX_URL_LENGTH = 2048


def validate_callback_url(url: str) -> str:
    """An absolute http(s) URL with a host, or `InvalidCallbackUrl` (422)."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or len(url) > MAX_URL_LENGTH
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(ch.isspace() for ch in url)
    ):
        raise InvalidCallbackUrl(
            "callback_url must be an absolute http:// or https:// URL with a host", callback_url=url[:200]
        )
    return url


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Receiver side: constant-time check of a signature header against the raw body."""
    return hmac.compare_digest(sign(secret, body), signature)


@dataclass(frozen=True, slots=True)
class Delivery:
    delivered: bool
    attempts: int
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    delivered: bool
    final: bool
    error: str | None = None


class WebhookSender:
    """One long-lived client; `deliver` never raises for the receiver's failures."""

    def __init__(
        self,
        *,
        secret: str | None,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.secret = secret
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep  # with `clock`, lets a test step through the backoff without waiting for it
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSender:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        return cls(
            secret=secret,
            max_attempts=settings.webhook_max_attempts,
            backoff_s=settings.webhook_backoff_s,
            timeout_s=settings.webhook_timeout_s,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def encode(self, payload: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        """Body and headers for one attempt (fresh timestamp, so a retry is not a stale replay)."""
        timestamp = int(self.clock())
        body = json.dumps({**payload, "timestamp": timestamp}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp)}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        return body, headers

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed attempts before the next one (exponential)."""
        return float(self.backoff_s * 2 ** (attempts - 1))

    async def attempt(self, url: str, payload: Mapping[str, Any], number: int = 1) -> Attempt:
        """One signed POST; `final` when there is no point in another (delivered, or refused with a 4xx)."""
        body, headers = self.encode(payload)
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if response.is_success:
                return Attempt(delivered=True, final=True)
            error = f"HTTP {response.status_code}"
            if response.status_code < 500:  # 4xx (or a redirect): the receiver said no
                log.warning("webhook to %s refused with %s; not retried", _host(url), error)
                return Attempt(delivered=False, final=True, error=error)
        if number >= self.max_attempts:
            log.warning("webhook to %s gave up after %d attempts: %s", _host(url), number, error)
            return Attempt(delivered=False, final=True, error=error)
        log.info("webhook to %s attempt %d/%d failed: %s", _host(url), number, self.max_attempts, error)
        return Attempt(delivered=False, final=False, error=error)

    async def deliver(self, url: str, payload: Mapping[str, Any]) -> Delivery:
        """Every attempt in a row, here (the outbox spreads them over time and replicas instead)."""
        for number in range(1, self.max_attempts + 1):
            if number > 1:
                await self.sleep(self.backoff(number - 1))
            attempt = await self.attempt(url, payload, number)
            if attempt.final:
                return Delivery(attempt.delivered, number, attempt.error)
        raise AssertionError("unreachable: the last attempt is final")


def _host(url: str) -> str:
    """Log the receiver's host only: a callback URL may carry a token in its path or query."""
    return urlsplit(url).netloc or "?"

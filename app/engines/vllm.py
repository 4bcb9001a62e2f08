"""Engine that sends pages to a vLLM server over its OpenAI-compatible API.

vLLM batches concurrent requests itself, so this engine never batches: every
page is its own request, and throughput comes from keeping up to
MAX_CONCURRENT_PAGES of them in flight (one semaphore shared by all documents).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import anyio
import httpx
from PIL import Image

from app.engines.base import EngineBase, EngineInfo, Sampling
from app.errors import EngineError, EngineTimeout, EngineUnavailable, PageRejected
from app.imaging import encode_png, png_data_url
from app.intake.document import pad_to_min_side
from app.results import Generation
from app.settings import Settings

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 5.0
# vLLM resizes pages to whole 28-px merged patches and fails on a side shorter than that
# (REFERENCE.md; LightOnOCR's profile: patch 14 x spatial merge 2). Shorter sides are padded.
MIN_SIDE = 28


class _TransientFailure(Exception):
    """A failure worth another try: connection trouble, overload (429, 503) or a 5xx not tied to the page.

    Internal to this engine's retry loop (not `app.errors.Retryable`, which a client sees with Retry-After):
    after the last try it becomes `EngineUnavailable` (connection) or `EngineError`.
    """

    def __init__(self, message: str, *, connection: bool, summary: str = "") -> None:
        super().__init__(message)
        self.connection = connection
        self.summary = summary  # what the client may see (no addresses, no reprs)


class VLLMEngine(EngineBase):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._base_url = settings.vllm_base_url
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_pages)
        self._client: httpx.AsyncClient | None = None
        self._last_health_problem: str | None = None

    def _health_problem(self, detail: str) -> None:
        """Log the detail (address, exception) once per change: probes call this every few seconds."""
        if detail != self._last_health_problem:
            log.warning("%s", detail)
            self._last_health_problem = detail

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._settings.vllm_api_key}"} if self._settings.vllm_api_key else {}
        slots = self._settings.max_concurrent_pages
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            timeout=httpx.Timeout(self._settings.vllm_page_timeout_s, connect=10.0),
            # Two connections beyond the page semaphore so /ready's health check never waits behind pages.
            limits=httpx.Limits(max_connections=slots + 2, max_keepalive_connections=slots + 2),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("VLLMEngine used before start()")
        return self._client

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="vllm",
            model=self._settings.model_name,
            device=f"remote ({self._base_url})",
            max_pages_in_flight=self._settings.max_concurrent_pages,
        )

    async def check_health(self) -> None:
        """Ready means: the server answers and serves MODEL_NAME."""
        retry_after = self._settings.retry_after_s
        try:
            response = await self.client.get("/models", timeout=_HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            self._health_problem(f"vLLM server at {self._base_url} is unreachable: {exc!r}")
            raise EngineUnavailable(
                "the vLLM server is unreachable (see VLLM_BASE_URL and the log)", retry_after=retry_after
            ) from None
        if response.status_code != 200:
            self._health_problem(f"vLLM server at {self._base_url} answered {response.status_code} to /models")
            raise EngineUnavailable(
                f"the vLLM server answered HTTP {response.status_code} to /models",
                retry_after=retry_after,
            )
        self._last_health_problem = None
        try:
            models = {str(model["id"]): model for model in response.json()["data"]}
        except (ValueError, KeyError, TypeError):
            raise EngineUnavailable("vLLM /models answer is not OpenAI-shaped", retry_after=retry_after) from None
        model = models.get(self._settings.model_name)
        if model is None:
            raise EngineUnavailable(
                f"vLLM server serves {list(models)}, not {self._settings.model_name!r} (MODEL_NAME)",
                retry_after=retry_after,
                served=list(models),
            )
        context = model.get("max_model_len")
        if isinstance(context, int) and self._settings.max_new_tokens >= context:
            # vLLM would reject every page with a 400: say so before any page is sent.
            raise EngineUnavailable(
                f"MAX_NEW_TOKENS={self._settings.max_new_tokens} does not fit the server's "
                f"max_model_len={context}: lower MAX_NEW_TOKENS or raise --max-model-len",
                retry_after=retry_after,
            )

    def payload(self, png: bytes, sampling: Sampling) -> dict[str, Any]:
        """The authors' request: one user turn holding only the page image."""
        return {
            "model": self._settings.model_name,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(png)}}]}],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }

    def encode_page(self, image: Image.Image, sampling: Sampling) -> dict[str, Any]:
        """The request body for a page (PNG + base64): CPU work, run in a worker thread."""
        return self.payload(encode_png(pad_to_min_side(image, MIN_SIDE)), sampling)

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        # Encoding (PNG and base64) happens in a worker thread before taking a slot, so it
        # overlaps with pages in flight and never blocks the event loop.
        payload = await anyio.to_thread.run_sync(self.encode_page, image, sampling)
        async with self._semaphore:
            return await self._post_with_retries(payload)

    async def _post_with_retries(self, payload: dict[str, Any]) -> Generation:
        attempts = self._settings.vllm_max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._post(payload)
            except _TransientFailure as exc:
                if attempt == attempts:
                    # The detail (address, exception, upstream body) goes to the log under the
                    # request id; the client gets a message without internal addresses or reprs.
                    log.warning("vLLM server at %s failed %d times; last: %s", self._base_url, attempts, exc)
                    if exc.connection:
                        raise EngineUnavailable(
                            f"the vLLM server could not be reached ({attempts} attempts)",
                            retry_after=self._settings.retry_after_s,
                        ) from None
                    raise EngineError(f"the vLLM server failed {attempts} times ({exc.summary})") from None
                delay = self._settings.vllm_retry_backoff_s * 2 ** (attempt - 1)
                log.debug("vLLM request failed (%s); retry %d/%d in %.2fs", exc, attempt, attempts - 1, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def _post(self, payload: dict[str, Any]) -> Generation:
        try:
            response = await self.client.post("/chat/completions", json=payload)
        except httpx.ConnectTimeout as exc:
            raise _TransientFailure(repr(exc), connection=True) from None
        except httpx.TimeoutException:
            # Not retried: a page that took VLLM_PAGE_TIMEOUT_S once would likely do it again.
            raise EngineTimeout(
                f"vLLM did not answer a page within {self._settings.vllm_page_timeout_s:g}s (VLLM_PAGE_TIMEOUT_S)"
            ) from None
        except httpx.TransportError as exc:
            raise _TransientFailure(repr(exc), connection=True) from None
        status = response.status_code
        if status == 200:
            return _parse_completion(response)
        upstream = _error_message(response)
        if status == 400 or (status == 500 and upstream is not None and not _engine_in_trouble(upstream)):
            # vLLM could not process this input: the same page would get the same answer.
            log.warning("vLLM rejected a page with HTTP %d: %s", status, (upstream or response.text)[:500])
            raise PageRejected(
                f"the model cannot process this page (vLLM answered HTTP {status})", upstream_status=status
            )
        if status >= 500 or status == 429:
            raise _TransientFailure(f"HTTP {status}: {response.text[:200]}", connection=False, summary=f"HTTP {status}")
        log.warning("vLLM refused a page with HTTP %d: %s", status, response.text[:500])
        raise EngineError(f"vLLM refused the page with HTTP {status}", upstream_status=status)


# Words in a 500's message that mean the server itself is in trouble, not this page: retried.
_ENGINE_TROUBLE = ("enginecore", "enginedead", "engine dead", "out of memory", "cuda error", "overloaded")


def _error_message(response: httpx.Response) -> str | None:
    """The message of vLLM's error body `{"error": {"message", "type", "param", "code"}}`, if it is one."""
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def _engine_in_trouble(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _ENGINE_TROUBLE)


def _parse_completion(response: httpx.Response) -> Generation:
    try:
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
        finish = choice.get("finish_reason")
        usage = body.get("usage") or {}
        tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError):
        # The body may hold document text: describe it, never quote it (messages reach the logs).
        raise EngineError(
            f"vLLM answer is not a chat completion ({len(response.content)} bytes, "
            f"content-type {response.headers.get('content-type')!r})"
        ) from None
    return Generation(text=str(text), finish_reason="length" if finish == "length" else "stop", tokens=tokens)

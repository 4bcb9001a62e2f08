"""Engine that sends pages to one vLLM server, or a fleet of them, over the OpenAI-compatible API.

The same engine serves MODEL_SOURCE=openai: any OpenAI-compatible server (llama.cpp's `llama-server`,
mlx-vlm, ...). Then MODEL_NAME may be left unset: the engine uses the one model the server lists, as
LightOn's client does. What differs between servers is read in `app/engines/servers.py`.

vLLM batches concurrent requests itself, so this engine never batches: every
page is its own request, and throughput comes from keeping up to
MAX_CONCURRENT_PAGES of them in flight per server (shared by all documents).
With several servers (`VLLM_BASE_URL=a,b,c`) each page goes to the least loaded
healthy one (`app/engines/fleet.py`); a failing server leaves the rotation and is
probed on /models every `PROBE_INTERVAL_S` until it serves MODEL_NAME again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import anyio
import httpx
from PIL import Image

from app.background import cancel_and_wait
from app.engines.base import EngineBase, EngineInfo, Sampling
from app.engines.fleet import Endpoint, Fleet, display_url
from app.engines.servers import NotOpenAIShaped, ServedModel, ServerKind, error_message, request_extras, served_models
from app.errors import EngineError, EngineNotReady, EngineTimeout, EngineUnavailable, PageRejected, ServiceUnavailable
from app.imaging import encode_png, png_data_url
from app.intake.document import EncodedPage, pad_to_min_side
from app.profiles import Profile, active_profile
from app.results import Generation
from app.settings import ModelSource, Settings, SettingsError

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 5.0
# How often a server out of the rotation is probed on /models.
PROBE_INTERVAL_S = 3.0


class _TransientFailure(Exception):
    """A failure worth another try: connection trouble, overload (429, 503) or a 5xx not tied to the page.

    Internal to this engine's retry loop (not `app.errors.Retryable`, which a client sees with Retry-After):
    after the last try it becomes `EngineUnavailable` (connection) or `EngineError`.
    """

    def __init__(self, message: str, *, connection: bool, summary: str = "", overload: bool = False) -> None:
        super().__init__(message)
        self.connection = connection
        self.summary = summary  # what the client may see (no addresses, no reprs)
        self.overload = overload  # 429: the server is busy, not broken (it stays in the rotation)


class VLLMEngine(EngineBase):
    def __init__(self, settings: Settings, *, source: ModelSource = ModelSource.VLLM) -> None:
        self._settings = settings
        self._profile: Profile = active_profile(settings).row
        self._endpoints = settings.vllm_endpoints
        self._fleet: Fleet | None = None
        self._prober: asyncio.Task[None] | None = None
        self._source = source
        # What messages call the server: "vLLM server", or "model server" for any OpenAI-compatible one.
        self._what = "vLLM server" if source is ModelSource.VLLM else "model server"
        # The model to ask for: MODEL_NAME, or (openai, MODEL_NAME unset) the one the server lists, found in start().
        explicit = source is ModelSource.VLLM or "model_name" in settings.model_fields_set
        self._model: str | None = settings.model_name if explicit else None
        # The id the server listed when MODEL_NAME was left to it (the service looks the profile up by it).
        self.served_model: str | None = None
        # Which server each endpoint is (by index), learnt from its /models listing: requests to llama-server
        # carry its sampling switches (`servers.request_extras`). Unknown until listed: protocol only.
        self._default_kind = ServerKind.VLLM if source is ModelSource.VLLM else ServerKind.OTHER
        self._kinds: dict[int, ServerKind] = {}
        self._status: tuple[type[ServiceUnavailable], str] = (EngineNotReady, f"connecting to the {self._what}")

    @property
    def model(self) -> str:
        """The model every request names (MODEL_NAME, or the one the server lists)."""
        return self._model if self._model is not None else self._settings.model_name

    def startup_status(self) -> tuple[type[ServiceUnavailable], str]:
        return self._status

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._settings.vllm_api_key}"} if self._settings.vllm_api_key else {}
        endpoints = []
        for index, (url, capacity) in enumerate(self._endpoints):
            client = httpx.AsyncClient(
                base_url=url,
                headers=headers,
                timeout=httpx.Timeout(self._settings.vllm_page_timeout_s, connect=10.0),
                # Two connections beyond the page slots so health checks never wait behind pages.
                limits=httpx.Limits(max_connections=capacity + 2, max_keepalive_connections=capacity + 2),
            )
            endpoints.append(Endpoint(index=index, url=url, capacity=capacity, client=client))
        self._fleet = Fleet(endpoints)
        if self._model is None:
            await self._discover_model()
        elif self._source is not ModelSource.VLLM:
            # Learn which servers these are before the first page (a server down now is learnt by its probe).
            await asyncio.gather(*(self._check_endpoint(e) for e in self._fleet.endpoints), return_exceptions=True)
        self._prober = asyncio.create_task(self._probe_forever(), name="vllm-probes")

    async def _discover_model(self) -> None:
        """MODEL_NAME unset (openai): take the one model the first answering server lists.

        While no server answers, retry every MODEL_LOAD_RETRY_S (0: fail at once); the service is "starting"
        meanwhile. A server listing several models is a configuration error: start fails naming MODEL_NAME.
        """
        retry_s = self._settings.model_load_retry_s
        while True:
            failures: list[str] = []
            for endpoint in self.fleet.endpoints:
                try:
                    models = await self._list_models(endpoint)
                except EngineUnavailable as exc:
                    failures.append(exc.message)
                    continue
                if len(models) != 1:
                    listed = ", ".join(repr(model.id) for model in models) or "none"
                    raise SettingsError(
                        f"MODEL_NAME is not set and the {self._what} at {endpoint.display} lists "
                        f"{len(models)} models ({listed}): set MODEL_NAME to the one to use"
                    )
                self._model = self.served_model = models[0].id
                self._profile = active_profile(self._settings, model=self._model).row
                self._kinds[endpoint.index] = models[0].kind
                log.info("MODEL_NAME not set: using %r, the model the %s serves", self._model, self._what)
                return
            message = f"waiting for the {self._what} to list its model: {failures[0]}"
            if retry_s <= 0:
                self._status = (EngineUnavailable, message)
                raise EngineUnavailable(message, retry_after=self._settings.retry_after_s)
            self._status = (EngineUnavailable, f"{message}; retrying in {retry_s:g} s")
            await asyncio.sleep(retry_s)

    async def close(self) -> None:
        await cancel_and_wait(self._prober)
        self._prober = None
        if self._fleet is not None:
            for endpoint in self._fleet.endpoints:
                await endpoint.client.aclose()
            self._fleet = None

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            raise RuntimeError("VLLMEngine used before start()")
        return self._fleet

    @property
    def client(self) -> httpx.AsyncClient:
        """The first server's client (the only one with a single URL)."""
        return self.fleet.endpoints[0].client

    def info(self) -> EngineInfo:
        urls = [display_url(url) for url, _ in self._endpoints]
        device = f"remote ({urls[0]})" if len(urls) == 1 else f"remote ({len(urls)} {self._what}s)"
        fleet = self._fleet
        return EngineInfo(
            engine=self._source.value,
            model=self.model,
            device=device,
            max_pages_in_flight=sum(capacity for _, capacity in self._endpoints),
            endpoints=tuple(endpoint.state() for endpoint in fleet.endpoints) if fleet is not None else (),
        )

    def _health_problem(self, endpoint: Endpoint, detail: str) -> None:
        """Log the detail (address, exception) once per change: probes call this every few seconds."""
        if detail != endpoint.last_problem:
            log.warning("%s", detail)
            endpoint.last_problem = detail

    def _mark_down(self, endpoint: Endpoint, reason: str) -> None:
        if self.fleet.mark_down(endpoint) and len(self.fleet.endpoints) > 1:
            log.warning("%s %s left the rotation (%s)", self._what, endpoint.display, reason)

    def _mark_up(self, endpoint: Endpoint) -> None:
        if self.fleet.mark_up(endpoint) and len(self.fleet.endpoints) > 1:
            log.warning("%s %s is back in the rotation", self._what, endpoint.display)

    async def check_health(self) -> None:
        """Ready means: at least one server answers and serves MODEL_NAME (each one is checked now)."""
        fleet = self.fleet
        outcomes = await asyncio.gather(
            *(self._check_endpoint(endpoint) for endpoint in fleet.endpoints), return_exceptions=True
        )
        problems: list[EngineUnavailable] = []
        for endpoint, outcome in zip(fleet.endpoints, outcomes, strict=True):
            if isinstance(outcome, EngineUnavailable):
                problems.append(outcome)
                self._mark_down(endpoint, "health check failed")
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self._mark_up(endpoint)
        if len(problems) < len(fleet.endpoints):
            return
        if len(problems) == 1:
            raise problems[0]
        raise EngineUnavailable(
            f"none of the {len(problems)} {self._what}s can serve (see VLLM_BASE_URL and the log); "
            f"first: {problems[0].message}",
            retry_after=self._settings.retry_after_s,
        )

    async def _probe_forever(self) -> None:
        """Every PROBE_INTERVAL_S, bring back the servers out of the rotation that serve MODEL_NAME again."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            down = [endpoint for endpoint in self.fleet.endpoints if not endpoint.healthy]
            outcomes = await asyncio.gather(*(self._check_endpoint(e) for e in down), return_exceptions=True)
            for endpoint, outcome in zip(down, outcomes, strict=True):
                if outcome is None:
                    self._mark_up(endpoint)
                elif not isinstance(outcome, EngineUnavailable):
                    log.warning("probing %s %s failed unexpectedly: %r", self._what, endpoint.display, outcome)

    async def _list_models(self, endpoint: Endpoint) -> list[ServedModel]:
        """The models this server lists on /models; EngineUnavailable when it cannot say."""
        retry_after = self._settings.retry_after_s
        try:
            response = await endpoint.client.get("/models", timeout=_HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            self._health_problem(endpoint, f"{self._what} at {endpoint.display} is unreachable: {exc!r}")
            raise EngineUnavailable(
                f"the {self._what} is unreachable (see VLLM_BASE_URL and the log)", retry_after=retry_after
            ) from None
        if response.status_code != 200:
            self._health_problem(
                endpoint, f"{self._what} at {endpoint.display} answered {response.status_code} to /models"
            )
            upstream = error_message(_json_or_none(response))
            # llama-server answers 503 "Loading model" until its weights are in: say so.
            said = f" ({upstream[:80]})" if upstream and response.status_code == 503 else ""
            raise EngineUnavailable(
                f"the {self._what} answered HTTP {response.status_code} to /models{said}",
                retry_after=retry_after,
            )
        endpoint.last_problem = None
        try:
            return served_models(response.json())
        except (ValueError, NotOpenAIShaped):
            raise EngineUnavailable(
                f"the {self._what}'s /models answer is not OpenAI-shaped", retry_after=retry_after
            ) from None

    async def _check_endpoint(self, endpoint: Endpoint) -> None:
        """Raise EngineUnavailable unless this server answers and serves the model."""
        retry_after = self._settings.retry_after_s
        models = await self._list_models(endpoint)
        wanted = self.model
        model = next((m for m in models if m.id == wanted), None) or next(
            (m for m in models if wanted in m.names), None
        )
        if model is None:
            source = "MODEL_NAME" if self._model == self._settings.model_name else "the model it listed at start"
            raise EngineUnavailable(
                f"{self._what} serves {[m.id for m in models]}, not {wanted!r} ({source})",
                retry_after=retry_after,
                served=[m.id for m in models],
            )
        self._kinds[endpoint.index] = model.kind
        # Checked only when the server says (vLLM's max_model_len, llama-server's n_ctx); others: nothing to check.
        if model.context is not None and self._settings.max_new_tokens >= model.context:
            # The server would reject every page with a 400: say so before any page is sent.
            flag = "--ctx-size" if model.kind is ServerKind.LLAMA_CPP else "--max-model-len"
            raise EngineUnavailable(
                f"MAX_NEW_TOKENS={self._settings.max_new_tokens} does not fit the server's "
                f"context of {model.context} tokens: lower MAX_NEW_TOKENS or raise {flag}",
                retry_after=retry_after,
            )

    def payload(self, png: bytes, sampling: Sampling) -> dict[str, Any]:
        """The authors' request (LightOn's client): one user turn holding the page image, then the text
        part when one is asked for (grounding), plus the profile's extra fields (`chat_template_kwargs`
        for the Qwen3.5-based checkpoints)."""
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": png_data_url(png)}}]
        if sampling.prompt is not None:
            content.append({"type": "text", "text": sampling.prompt})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            **self._profile.request_extra(),
        }

    def encode_page(self, image: Image.Image, sampling: Sampling) -> dict[str, Any]:
        """The request body for a page (PNG + base64): CPU work, run in a worker thread."""
        return self.payload(encode_png(pad_to_min_side(image, self._profile.min_side)), sampling)

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        # Encoding (PNG and base64) happens in a worker thread before taking a slot, so it
        # overlaps with pages in flight and never blocks the event loop.
        payload = await anyio.to_thread.run_sync(self.encode_page, image, sampling)
        return await self._post_with_retries(payload)

    @property
    def png_min_side(self) -> int:
        """app.engines.base.SendsPng: intake workers pad pages to this (the profile's smallest side) and encode them."""
        return self._profile.min_side

    async def recognize_png(self, page: EncodedPage, sampling: Sampling) -> Generation:
        """A page an intake worker already padded and encoded (`SendsPng`): only base64 and the body are left."""
        payload = await anyio.to_thread.run_sync(self.payload, page.png, sampling)
        return await self._post_with_retries(payload)

    async def _post_with_retries(self, payload: dict[str, Any]) -> Generation:
        """Each attempt takes a slot on the best server; after a failure the next prefers another server.

        Attempts are sequential, so a page is never at two servers at once; a page whose server died is
        sent again elsewhere within VLLM_MAX_RETRIES.
        """
        fleet = self.fleet
        attempts = self._settings.vllm_max_retries + 1
        failed: Endpoint | None = None
        for attempt in range(1, attempts + 1):
            endpoint = await fleet.acquire(avoid=failed)
            try:
                generation = await self._post(endpoint, payload)
            except _TransientFailure as exc:
                endpoint.errors += 1
                if not exc.overload:
                    self._mark_down(endpoint, exc.summary or "connection failed")
                failed = endpoint
                if attempt == attempts:
                    # The detail (address, exception, upstream body) goes to the log under the
                    # request id; the client gets a message without internal addresses or reprs.
                    log.warning("%s at %s failed %d times; last: %s", self._what, endpoint.display, attempts, exc)
                    if exc.connection:
                        raise EngineUnavailable(
                            f"the {self._what} could not be reached ({attempts} attempts)",
                            retry_after=self._settings.retry_after_s,
                        ) from None
                    raise EngineError(f"the {self._what} failed {attempts} times ({exc.summary})") from None
            except EngineTimeout:
                endpoint.errors += 1
                self._mark_down(endpoint, "page timeout")
                raise
            else:
                endpoint.pages += 1
                if not endpoint.healthy:
                    self._mark_up(endpoint)  # it answered a page: it serves again
                return generation
            finally:
                fleet.release(endpoint)
            if any(e.healthy and e is not failed for e in fleet.endpoints):
                # Another server can take the page now: move it there without waiting.
                log.debug(
                    "vLLM request failed at %s; moving the page (retry %d/%d)", failed.display, attempt, attempts - 1
                )
                continue
            delay = self._settings.vllm_retry_backoff_s * 2 ** (attempt - 1)
            log.debug("vLLM request failed; retry %d/%d in %.2fs", attempt, attempts - 1, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def _post(self, endpoint: Endpoint, payload: dict[str, Any]) -> Generation:
        try:
            extras = request_extras(self._kinds.get(endpoint.index, self._default_kind))
            body = json_body({**payload, **extras} if extras else payload)
            response = await endpoint.client.post(
                "/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.ConnectTimeout as exc:
            raise _TransientFailure(repr(exc), connection=True, summary="connect timeout") from None
        except httpx.TimeoutException:
            # Not retried: a page that took VLLM_PAGE_TIMEOUT_S once would likely do it again.
            raise EngineTimeout(
                f"the {self._what} did not answer a page within "
                f"{self._settings.vllm_page_timeout_s:g}s (VLLM_PAGE_TIMEOUT_S)"
            ) from None
        except httpx.TransportError as exc:
            raise _TransientFailure(repr(exc), connection=True, summary="connection failed") from None
        status = response.status_code
        if status == 200:
            return _parse_completion(response, self._what)
        upstream = _error_message(response)
        if status == 400 or (status == 500 and upstream is not None and not _engine_in_trouble(upstream)):
            # vLLM could not process this input: the same page would get the same answer.
            log.warning("%s rejected a page with HTTP %d: %s", self._what, status, (upstream or response.text)[:500])
            raise PageRejected(
                f"the model cannot process this page (the {self._what} answered HTTP {status})", upstream_status=status
            )
        if status >= 500 or status == 429:
            raise _TransientFailure(
                f"HTTP {status}: {response.text[:200]}",
                connection=False,
                summary=f"HTTP {status}",
                overload=status == 429,
            )
        log.warning("%s refused a page with HTTP %d: %s", self._what, status, response.text[:500])
        raise EngineError(f"the {self._what} refused the page with HTTP {status}", upstream_status=status)


# Words in a 500's message that mean the server itself is in trouble, not this page: retried.
_ENGINE_TROUBLE = ("enginecore", "enginedead", "engine dead", "out of memory", "cuda error", "overloaded")


# Stands for the page's data URL while the rest of a request is JSON-encoded (json_body).
_URL_PLACEHOLDER = "lightonocr-page-image-url-placeholder"


def json_body(payload: dict[str, Any]) -> bytes:
    """`payload` as JSON bytes, the page's data URL spliced in rather than scanned by the JSON encoder.

    The URL is most of the request (a megabyte of base64) and needs no escaping (`data:image/png;base64,` and
    the base64 alphabet): json.dumps scanning it cost 1.6 ms per page on the event loop, the splice a copy.
    Same bytes as `json.dumps(payload).encode()` (tests/engines/test_vllm.py).
    """
    parts = [part for message in payload["messages"] for part in message["content"] if "image_url" in part]
    url = parts[0]["image_url"]["url"] if len(parts) == 1 else None
    if not isinstance(url, str) or not url.isascii() or '"' in url or "\\" in url:
        return json.dumps(payload).encode()
    image_part = parts[0]
    messages = [
        {
            **message,
            "content": [
                {**part, "image_url": {**part["image_url"], "url": _URL_PLACEHOLDER}} if part is image_part else part
                for part in message["content"]
            ],
        }
        for message in payload["messages"]
    ]
    head, sep, tail = json.dumps({**payload, "messages": messages}).partition(f'"{_URL_PLACEHOLDER}"')
    if not sep or _URL_PLACEHOLDER in tail:
        return json.dumps(payload).encode()
    return b"".join((head.encode(), b'"', url.encode("ascii"), b'"', tail.encode()))


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str | None:
    """The server's error message, whichever server's error-body shape it is in (`servers.error_message`)."""
    return error_message(_json_or_none(response))


def _engine_in_trouble(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _ENGINE_TROUBLE)


def _parse_completion(response: httpx.Response, what: str) -> Generation:
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
            f"the {what}'s answer is not a chat completion ({len(response.content)} bytes, "
            f"content-type {response.headers.get('content-type')!r})"
        ) from None
    return Generation(text=str(text), finish_reason="length" if finish == "length" else "stop", tokens=tokens)

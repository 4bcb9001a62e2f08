"""Log lines: the two formats, the handler set-up, and what must never be written (document text, keys)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from app.logs import JsonFormatter, TextFormatter, request_id, setup_logging
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, page_id_of
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

PAGE_PT = (144, 180)


def record(message: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("app.test", logging.WARNING, __file__, 1, message, args, exc_info)
    made.__dict__.update(extra)
    return made


def test_json_is_one_object_per_line_with_extra_fields() -> None:
    line = JsonFormatter().format(record("page %d\nfailed", 3, exc=True, request_id="r1", status=502))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "app.test"
    assert entry["message"] == "page 3\nfailed"
    assert entry["request_id"] == "r1"
    assert entry["status"] == 502
    assert "ValueError: boom" in entry["exception"]
    assert entry["timestamp"].endswith("+00:00")


def test_text_shows_request_id_and_fields() -> None:
    line = TextFormatter().format(record("GET %s", "/info", request_id="r2", status=200))
    assert " WARNING app.test [r2]: GET /info status=200" in line
    assert "[" not in TextFormatter().format(record("no request"))


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_setup_replaces_only_its_own_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    others = [handler for handler in root.handlers if type(handler).__name__ != "_StderrHandler"]
    setup_logging("text", "INFO")
    setup_logging("json", "warning")
    ours = [handler for handler in root.handlers if type(handler).__name__ == "_StderrHandler"]
    assert len(ours) == 1
    assert [handler for handler in root.handlers if handler not in ours] == others
    assert root.level == logging.WARNING
    capsys.readouterr()
    token = request_id.set("ctx-9")
    try:
        logging.getLogger("app.x").warning("hello %s", "there", extra={"pages": 3})
        logging.getLogger("app.x").info("below the level")
    finally:
        request_id.reset(token)
    [line] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert line["message"] == "hello there"
    assert line["request_id"] == "ctx-9"
    assert line["pages"] == 3


def wait_for_access_lines(capsys: pytest.CaptureFixture[str], count: int) -> str:
    """Everything logged until `count` access lines are out (each is written after its response)."""
    captured = ""
    deadline = time.monotonic() + 10
    while captured.count('"logger": "app.access"') < count and time.monotonic() < deadline:
        captured += capsys.readouterr().err
        time.sleep(0.01)
    return captured


def test_no_document_text_passwords_or_keys_in_logs(
    stub: StubVLLM, vllm_service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retries, a failed page, a 401 and debug-level probes: none writes text, keys or passwords."""
    secret_text = "Confidential salary of Jane Doe: 123456"

    def responder(request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        if page == 1 and request.attempt == 1:
            return Reply(text=secret_text, finish_reason="length")  # truncated: retried
        if page == 2:
            return Reply(status=400, message="rejected")
        return Reply(text=secret_text)

    stub.responder = responder
    url = vllm_service(log_format="json", log_level="DEBUG", api_keys="key-AAAA-1111", vllm_max_retries=0)
    capsys.readouterr()
    pdf = make_pdf(3, PAGE_PT)
    good = {"Authorization": "Bearer key-AAAA-1111"}
    response = httpx.post(
        f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, data={"password": "pw-ZZZZ"}, headers=good, timeout=60
    )
    assert response.status_code == 200
    assert secret_text in response.text
    wrong = {"Authorization": "Bearer key-BBBB-2222"}
    assert httpx.post(f"{url}/api/inference", files={"file": ("a.pdf", pdf)}, headers=wrong).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200

    logged = wait_for_access_lines(capsys, 3)
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any("retrying" in message for message in messages)
    assert any("page 2 failed" in message for message in messages)
    assert any(line.get("route") == "/health" and line["level"] == "DEBUG" for line in lines)
    for secret in ("Confidential", "Jane Doe", "key-AAAA-1111", "key-BBBB-2222", "pw-ZZZZ"):
        assert secret not in logged


def test_probes_are_not_logged_at_info(vllm_service: ServiceFactory, capsys: pytest.CaptureFixture[str]) -> None:
    url = vllm_service(log_format="json")
    capsys.readouterr()
    assert httpx.get(f"{url}/ready").status_code == 200
    assert httpx.get(f"{url}/info").status_code == 200
    logged = wait_for_access_lines(capsys, 1)
    routes = [json.loads(line).get("route") for line in logged.splitlines() if line.startswith("{")]
    assert routes == ["/info"]


# The libraries put a stderr handler of their own on their loggers (transformers and torch also
# stop propagation): lines that bypass LOG_FORMAT, or appear twice in text mode.
THIRD_PARTY = """
import logging, sys, warnings
fmt, when, with_torch = sys.argv[1], sys.argv[2], sys.argv[3] == "torch"
if when == "before":
    import huggingface_hub.utils.logging, transformers
from app.logs import setup_logging
setup_logging(fmt, "INFO")
import huggingface_hub.file_download, transformers  # after: the HF engine imports them when it loads
if with_torch:
    import torch
    logging.getLogger("torch.distributed").warning("torch warns")
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as transformers_logging
hub_logging.get_logger("huggingface_hub.file_download").warning("hub warns")
transformers_logging.get_logger("transformers.modeling_utils").warning("transformers warns")
logging.getLogger("httpx").warning("httpx warns")
logging.getLogger("uvicorn.error").warning("uvicorn warns")
warnings.warn("a python warning", FutureWarning)
"""
MESSAGES = ("hub warns", "transformers warns", "httpx warns", "uvicorn warns", "a python warning")


def run_third_party(fmt: str, when: str, torch: bool = False) -> list[str]:
    import subprocess

    command = [sys.executable, "-c", THIRD_PARTY, fmt, when, "torch" if torch else "-"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout == ""
    return done.stderr.splitlines()


@pytest.mark.parametrize(("when", "torch"), [("before", False), ("after", True)])
def test_json_third_party_lines_are_json_too(when: str, torch: bool) -> None:
    """LOG_FORMAT=json: every stderr line is one JSON object, the libraries' warnings included, once each."""
    lines = run_third_party("json", when, torch)
    entries = [json.loads(line) for line in lines]  # raises on any raw line
    for message in (*MESSAGES, "torch warns") if torch else MESSAGES:
        assert sum(message in entry["message"] for entry in entries) == 1, (message, lines)


def test_text_third_party_warnings_appear_once() -> None:
    lines = run_third_party("text", "after")
    for message in MESSAGES:
        assert sum(message in line for line in lines) == 1, (message, lines)
    assert all(" WARNING " in line for line in lines if any(message in line for message in MESSAGES))

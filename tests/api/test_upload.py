"""The upload reader against real clients on loopback: slow and stalled senders.

Requests go over raw sockets (`tests.hostile.cases.send`, or by hand), so what the
server sees is exactly what a slow client on a real network would send.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

from tests.conftest import ServiceFactory, make_settings
from tests.hostile.cases import HttpRequest, Part, form_type, good_png, multipart, send

HOST = "127.0.0.1"
IDLE_S = 1.0  # UPLOAD_IDLE_TIMEOUT_S in these tests: a tenth of a second between pieces is live


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_slow_but_steady_upload_is_read(vllm_service: ServiceFactory) -> None:
    """Bytes keep arriving for longer than the idle timeout (and than the old total timeout): still read."""
    url = vllm_service(upload_idle_timeout_s=IDLE_S, upload_timeout_s=120)
    body = multipart([Part("file", good_png(), "a.png", "image/png")])
    pieces = 30  # one every 0.1 s: about 3 s in all, three times the idle timeout

    def trickle() -> Iterator[bytes]:
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            yield body[start : start + size]

    outcome = send(HttpRequest(form_type(), trickle, pause_s=0.1), HOST, _port(url))
    assert outcome.status == 200, outcome.body
    assert json.loads(outcome.body)["text"] == "page 7"


def test_a_stalled_upload_gets_408(vllm_service: ServiceFactory) -> None:
    """Half the body, then nothing: refused once no byte came for UPLOAD_IDLE_TIMEOUT_S."""
    url = vllm_service(upload_idle_timeout_s=IDLE_S, upload_timeout_s=120)
    body = multipart([Part("file", good_png(), "a.png", "image/png")])
    head = (
        f"POST /api/inference HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {form_type()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, _port(url)), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "upload_timeout"
    assert "UPLOAD_IDLE_TIMEOUT_S" in error["message"]


def test_default_total_cap_lets_a_slow_client_send_a_full_size_file() -> None:
    """At 15 KB/s (a poor mobile link) a file of MAX_FILE_SIZE_MB must fit in UPLOAD_TIMEOUT_S by default."""
    settings = make_settings()
    assert settings.upload_timeout_s >= settings.max_file_bytes / 15_000
    assert settings.upload_idle_timeout_s < settings.upload_timeout_s

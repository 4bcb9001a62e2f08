"""`lightonocr`: in-process on the tiny real model, against a live service, and `serve` as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner, Result

from app import __version__
from app.cli import cli
from app.main import create_app
from app.results import DocumentResult, PageResult
from app.settings import get_settings
from app.text import markdown_to_text
from tests.conftest import ServiceFactory, make_settings
from tests.support.documents import make_pdf, make_png, page_id_of
from tests.support.http import free_port
from tests.support.openai_stub import Reply, StubRequest, StubVLLM, default_responder
from tests.support.server import ServedApp

PAGE_PT = (144, 180)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run where no `.env` is, with settings read afresh from this test's environment."""
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def inputs(workdir: Path) -> dict[str, Path]:
    folder = workdir / "in"
    folder.mkdir()
    files = {
        "a": folder / "a.pdf",
        "b": folder / "b.png",
        "bad": folder / "bad.pdf",
    }
    files["a"].write_bytes(make_pdf(3, PAGE_PT))
    files["b"].write_bytes(make_png(300, 400, page_id=7))
    files["bad"].write_bytes(b"this is not a document")
    return files


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


# -- txt ---------------------------------------------------------------------------------


def test_txt_strips_markup_and_keeps_words() -> None:
    markdown = (
        "# Annual *report*\n\n"
        "Revenue grew **12%**, see [the table](http://x/t) and `code`.\n\n"
        "| Year | Total |\n|---|---:|\n| 2024 | 5 |\n\n"
        "<table><tr><th>A</th><th>B</th></tr><tr><td>1 &amp; 2</td><td>3</td></tr></table>\n\n"
        "```python\nprint(1)\n```\n\n"
        "- item with $x_1 + y_2$\n\n![a chart](img.png)\n\n> quoted"
    )
    assert markdown_to_text(markdown) == (
        "Annual report\n\n"
        "Revenue grew 12%, see the table and code.\n\n"
        "Year\tTotal\n2024\t5\n\n"
        "A\tB\n1 & 2\t3\n\n"
        "print(1)\n\n"
        "- item with $x_1 + y_2$\n\nquoted\n"
    )


# -- in process ----------------------------------------------------------------------------


@pytest.fixture
def tiny_env(tiny_checkpoint: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MODEL_SOURCE": "huggingface",
        "MODEL_NAME": str(tiny_checkpoint),
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "8",
        "RETRY_TEMPERATURES": "",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("tiny_env")
def test_in_process_writes_json_and_reports_the_bad_file(inputs: dict[str, Path], workdir: Path) -> None:
    result = invoke("ocr", str(inputs["a"]), str(inputs["bad"]), str(inputs["b"]), "-o", "out", "--format", "json")
    assert result.exit_code == 1, result.output
    assert sorted(path.name for path in (workdir / "out").iterdir()) == ["a.json", "b.json"]
    a = DocumentResult.model_validate_json((workdir / "out" / "a.json").read_text())
    assert [page.page for page in a.pages] == [1, 2, 3]
    assert all(page.tokens > 0 for page in a.pages)
    assert len(DocumentResult.model_validate_json((workdir / "out" / "b.json").read_text()).pages) == 1
    assert "bad.pdf: unsupported_media_type" in result.stderr
    assert "1 of 3 file(s) failed" in result.stderr


@pytest.mark.usefixtures("tiny_env")
def test_in_process_reads_only_the_selected_page_into_the_current_directory(workdir: Path) -> None:
    """Page 2 is the only landscape page, so its image size shows which page the model was given."""
    document = workdir / "mixed.pdf"
    document.write_bytes(make_pdf(3, page_sizes_pt=[(144, 180), (180, 144), (144, 180)]))
    result = invoke("ocr", str(document), "--pages", "2", "-f", "json")
    assert result.exit_code == 0, result.output
    read = DocumentResult.model_validate_json((workdir / "mixed.json").read_text())
    assert [page.page for page in read.pages] == [2]
    page = read.pages[0]
    assert page.width is not None
    assert page.height is not None
    assert page.width > page.height
    assert page.tokens > 0
    assert result.stdout == ""  # progress and messages go to stderr
    assert "mixed.pdf → mixed.json (1 page" in result.stderr
    assert "engine ready" not in result.stderr  # INFO lines stay out of the way unless LOG_LEVEL asks for them


@pytest.mark.usefixtures("workdir")
def test_in_process_engine_failure_fails_every_file(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SOURCE", "huggingface")
    monkeypatch.setenv("MODEL_NAME", str(inputs["a"].parent / "no-such-checkpoint"))
    monkeypatch.setenv("DEVICE", "cpu")
    result = invoke("ocr", str(inputs["a"]), str(inputs["b"]))
    assert result.exit_code == 1
    assert result.stderr.count("the engine failed to start") == 2


@pytest.mark.usefixtures("workdir")
def test_bad_configuration_exits_2(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_PAGES", "zero")
    result = invoke("ocr", str(inputs["a"]))
    assert result.exit_code == 2
    assert "MAX_PAGES" in result.stderr


# -- against a service ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["md", "json", "txt"])
def test_server_writes_each_format(
    fmt: str, inputs: dict[str, Path], workdir: Path, vllm_service: ServiceFactory
) -> None:
    url = vllm_service()
    result = invoke("ocr", *(str(path) for path in inputs.values()), "--server", url, "-o", "out", "-f", fmt)
    assert result.exit_code == 1, result.output
    assert sorted(path.name for path in (workdir / "out").iterdir()) == [f"a.{fmt}", f"b.{fmt}"]
    a = (workdir / "out" / f"a.{fmt}").read_text()
    b = (workdir / "out" / f"b.{fmt}").read_text()
    if fmt == "json":
        assert DocumentResult.model_validate_json(a).text == "page 1\n\npage 2\n\npage 3"
        assert json.loads(b)["text"] == "page 7"
    else:
        assert a == "page 1\n\npage 2\n\npage 3\n"
        assert b == "page 7\n"
    assert "bad.pdf: unsupported_media_type" in result.stderr
    assert f"a.pdf → out/a.{fmt} (3 pages)" in result.stderr


def test_server_with_pages_and_keys(inputs: dict[str, Path], workdir: Path, vllm_service: ServiceFactory) -> None:
    url = vllm_service(api_keys="k-123")
    ok = invoke("ocr", str(inputs["a"]), "--server", url, "--api-key", "k-123", "--pages", "2-3")
    assert ok.exit_code == 0, ok.output
    assert (workdir / "a.md").read_text() == "page 2\n\npage 3\n"
    refused = invoke("ocr", str(inputs["b"]), "--server", url, "--api-key", "wrong")
    assert refused.exit_code == 1
    assert "unauthorized" in refused.stderr
    assert "wrong" not in refused.stderr.replace("unauthorized", "")


def test_server_error_event_mid_stream(inputs: dict[str, Path], stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    stub.responder = lambda request: Reply(status=400, message="no")
    url = vllm_service(vllm_max_retries=0)
    result = invoke("ocr", str(inputs["b"]), "--server", url)
    assert result.exit_code == 1
    assert "b.png: page_rejected" in result.stderr


def test_server_without_streaming_falls_back_to_json(inputs: dict[str, Path], workdir: Path) -> None:
    """An older service answers plain JSON whatever the Accept header says."""
    page = PageResult(
        page=1, text="# Old", width=10, height=10, finish_reason="stop", tokens=2, seconds=0.1, status="ok", attempts=1
    )
    document = DocumentResult(status="ok", text="# Old", blocks=[], model_version="m", pages=[page])

    async def inference(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(document.model_dump(mode="json"))

    app = Starlette(routes=[Route("/api/inference", inference, methods=["POST"])])
    with ServedApp(app, lifespan="off") as served:
        result = invoke("ocr", str(inputs["b"]), "--server", served.url, "-f", "txt")
    assert result.exit_code == 0, result.output
    assert (workdir / "b.txt").read_text() == "Old\n"


def test_server_busy_is_asked_again_after_retry_after(inputs: dict[str, Path], workdir: Path) -> None:
    """429/503 with Retry-After: wait as told and send again, instead of failing the file."""
    page = PageResult(
        page=1, text="# Late", width=10, height=10, finish_reason="stop", tokens=2, seconds=0.1, status="ok", attempts=1
    )
    document = DocumentResult(status="ok", text="# Late", blocks=[], model_version="m", pages=[page])
    answers = [(429, "rate_limited"), (503, "overloaded")]

    async def inference(request: Request) -> JSONResponse:
        await request.body()
        if answers:
            status, code = answers.pop(0)
            error = {"error": {"code": code, "message": "busy"}}
            return JSONResponse(error, status_code=status, headers={"Retry-After": "0"})
        return JSONResponse(document.model_dump(mode="json"))

    app = Starlette(routes=[Route("/api/inference", inference, methods=["POST"])])
    with ServedApp(app, lifespan="off") as served:
        result = invoke("ocr", str(inputs["b"]), "--server", served.url)
    assert result.exit_code == 0, result.output
    assert answers == []
    assert (workdir / "b.md").read_text() == "# Late\n"


def test_unreachable_server(inputs: dict[str, Path]) -> None:
    result = invoke("ocr", str(inputs["b"]), "--server", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "request to http://127.0.0.1:9 failed" in result.stderr


def test_server_files_run_several_at_once(workdir: Path, stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    """`--jobs 2`: each page waits until the other file's page has arrived too, so one at a time fails."""
    both_in = threading.Barrier(2)

    async def together(request: StubRequest) -> Reply:
        try:
            await asyncio.to_thread(both_in.wait, 30)
        except threading.BrokenBarrierError:
            return Reply(status=400, message="the files were read one at a time")
        return default_responder(request)

    stub.responder = together
    first, second = workdir / "first.png", workdir / "second.png"
    first.write_bytes(make_png(300, 400, page_id=1))
    second.write_bytes(make_png(300, 400, page_id=2))
    url = vllm_service(vllm_max_retries=0)
    result = invoke("ocr", str(first), str(second), "--server", url, "--jobs", "2", "-o", "out")
    assert result.exit_code == 0, result.output
    assert (workdir / "out" / "first.md").read_text() == "page 1\n"
    assert (workdir / "out" / "second.md").read_text() == "page 2\n"


def test_server_as_host_port_key_from_the_environment_password_from_a_file(
    workdir: Path, vllm_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secrets need not be arguments (they would show in `ps`); `host:port` means http."""
    url = vllm_service(api_keys="k-123")
    locked = workdir / "locked.pdf"
    locked.write_bytes(make_pdf(1, PAGE_PT, password="s3cret"))
    (workdir / "pw.txt").write_text("s3cret\n")
    monkeypatch.setenv("LIGHTONOCR_SERVER", url.removeprefix("http://"))
    monkeypatch.setenv("LIGHTONOCR_API_KEY", "k-123")
    result = invoke("ocr", str(locked), "--password-file", "pw.txt")
    assert result.exit_code == 0, result.output
    assert (workdir / "locked.md").read_text() == "page 1\n"
    assert "s3cret" not in result.output


def test_server_url_with_another_scheme_is_bad_usage(inputs: dict[str, Path]) -> None:
    result = invoke("ocr", str(inputs["b"]), "--server", "ftp://ocr:8000")
    assert result.exit_code == 2
    assert "expected host:port or an http(s):// URL" in result.stderr


def test_partial_document_names_its_pages(workdir: Path, stub: StubVLLM, vllm_service: ServiceFactory) -> None:
    """Page numbers, not counts: runs of three or more as ranges."""
    cut = {1, 2, 3, 5, 6}
    stub.responder = lambda request: Reply(
        text=f"page {page_id_of(request.image)}",
        finish_reason="length" if page_id_of(request.image) in cut else "stop",
    )
    (workdir / "long.pdf").write_bytes(make_pdf(6, PAGE_PT))
    url = vllm_service(retry_temperatures="")
    result = invoke("ocr", "long.pdf", "--server", url)
    assert result.exit_code == 0, result.output  # written, marked `!`
    assert "(6 pages, partial: pages 1-3, 5, 6 truncated)" in result.stderr


def test_a_directory_reads_the_documents_inside_it(workdir: Path, vllm_service: ServiceFactory) -> None:
    folder = workdir / "scans"
    folder.mkdir()
    (folder / "report.pdf").write_bytes(make_pdf(1, PAGE_PT))
    (folder / "photo").write_bytes(make_png(300, 400, page_id=5))  # no extension: its bytes say PNG
    (folder / "notes.txt").write_text("not a document")
    (folder / "sub").mkdir()
    url = vllm_service()
    result = invoke("ocr", str(folder), "--server", url, "-o", "out")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (workdir / "out").iterdir()) == ["photo.md", "report.md"]
    assert (workdir / "out" / "photo.md").read_text() == "page 5\n"
    assert "2 file(s) to read; skipped 1 that are not PDFs or images: notes.txt" in result.stderr
    empty = invoke("ocr", str(folder / "sub"), "--server", url)
    assert empty.exit_code == 2
    assert "nothing to read" in empty.stderr


def test_interrupt_keeps_finished_outputs_and_says_what_is_missing(
    workdir: Path, stub: StubVLLM, vllm_service: ServiceFactory
) -> None:
    """Ctrl-C while one file is still being read: the files already done are on disk, written as each finished."""
    release = threading.Event()

    async def hold_page_2(request: StubRequest) -> Reply:
        if page_id_of(request.image) == 2:
            await asyncio.to_thread(release.wait, 120)
        return default_responder(request)

    stub.responder = hold_page_2
    for number, name in enumerate(["one", "two", "three"], start=1):
        (workdir / f"{name}.png").write_bytes(make_png(300, 400, page_id=number))
    url = vllm_service()
    command = [sys.executable, "-c", "from app.cli import main; main()", "ocr", "one.png", "two.png", "three.png"]
    process = subprocess.Popen([*command, "--server", url, "-o", "out"], cwd=workdir, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((workdir / "out" / "one.md").exists() and (workdir / "out" / "three.md").exists()):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "nothing was written while a file was still being read"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert sorted(path.name for path in (workdir / "out").iterdir()) == ["one.md", "three.md"]
    assert (workdir / "out" / "one.md").read_text() == "page 1\n"
    assert "Interrupted: 2 of 3 file(s) written." in stderr
    assert "Not written: two.png" in stderr


# -- help and version ----------------------------------------------------------------------


def test_version_and_plain_help() -> None:
    version = invoke("--version")
    assert version.exit_code == 0
    assert version.stdout == f"lightonocr {__version__}\n"
    help_text = invoke("ocr", "--help").stdout
    assert "Usage: lightonocr ocr [OPTIONS] FILE|DIR...\n" in help_text
    for words in ("-o, --output-dir DIR", "--jobs N", "--password-file FILE", "--server URL", "LIGHTONOCR_API_KEY"):
        assert words in help_text
    for command in ("ocr", "info", "serve"):
        help_text = invoke(command, "--help").stdout
        for noise in ("<list", "<str>", "<path>", "<int>", "<bool>", "TEXT", "PATH", "INTEGER"):
            assert noise not in help_text, (command, noise)


# -- info ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("workdir")
def test_info_in_process_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SOURCE", "vllm")
    monkeypatch.setenv("VLLM_BASE_URL", "http://vllm.example:8001/v1")
    monkeypatch.setenv("API_KEYS", "very-secret")
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["engine"] == "vllm"
    assert info["device"] == "remote (http://vllm.example:8001/v1)"
    assert info["api_keys"] == "on"
    assert "very-secret" not in result.stdout
    table = invoke("info")
    assert "limits.max_pages" in table.stdout


@pytest.mark.usefixtures("workdir")
def test_info_in_process_hides_server_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SOURCE", "vllm")
    monkeypatch.setenv("VLLM_BASE_URL", "http://user:hunter2@a.example:8001/v1,http://b.example:8002/v1#capacity=8")
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["vllm"]["base_url"] == "http://a.example:8001/v1,http://b.example:8002/v1"
    assert "hunter2" not in result.stdout


def test_info_from_server(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    result = invoke("info", "--server", url.removeprefix("http://"), "--json")  # host:port means http
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == httpx.get(f"{url}/info").json()


# -- serve -----------------------------------------------------------------------------------


def test_serve_runs_the_service_with_json_logs(stub: StubVLLM, workdir: Path) -> None:
    script = Path(sys.executable).with_name("lightonocr")
    if not script.exists():
        pytest.skip("the lightonocr console script is not installed (uv sync)")
    port = free_port()
    env = {**os.environ, "MODEL_SOURCE": "vllm", "VLLM_BASE_URL": stub.base_url, "LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [str(script), "serve", "--port", str(port)], env=env, cwd=workdir, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.05)
        response = httpx.post(f"{url}/api/inference", files={"file": ("b.png", make_png(300, 400, page_id=3))})
        assert response.json()["text"] == "page 3"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("shutdown complete" in line["message"] for line in lines), stderr  # graceful, lifespan closed
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines, as JSON
    access = [line for line in lines if line["logger"] == "app.access"]
    assert [(line["route"], line["status"]) for line in access] == [("/api/inference", 200)]
    assert access[0]["request_id"] == response.headers["X-Request-ID"]


# -- grounding -----------------------------------------------------------------------------


def test_server_grounding_with_headers_and_footers_dropped(inputs: dict[str, Path], workdir: Path) -> None:
    page = "![header](10,10,990,40) Running head\n![title](10,60,990,120) # Title\n![text](10,130,990,400) Body."
    with StubVLLM(lambda request: Reply(text=page if request.prompt else "plain"), model="LightOnOCR-3-1B") as stub:
        settings = {"model_source": "vllm", "vllm_base_url": stub.base_url, "model_name": "LightOnOCR-3-1B"}
        with ServedApp(create_app(make_settings(**settings))) as served:
            args = ("ocr", str(inputs["b"]), "--server", served.url, "--mode", "grounding")
            result = invoke(*args, "--drop-headers-footers", "-f", "json")
            assert result.exit_code == 0, result.output
            read = DocumentResult.model_validate_json((workdir / "b.json").read_text())
            assert [block.label for block in read.blocks] == ["header", "title", "text"]
            assert read.text == "# Title\n\nBody."
            assert invoke(*args, "-o", "md").exit_code == 0
            assert (workdir / "md" / "b.md").read_text().startswith("Running head\n\n# Title")
        assert stub.violations == []


@pytest.mark.usefixtures("workdir")
def test_in_process_grounding_on_a_model_without_it_fails_the_file(
    inputs: dict[str, Path], stub: StubVLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_SOURCE", "vllm")
    monkeypatch.setenv("VLLM_BASE_URL", stub.base_url)
    result = invoke("ocr", str(inputs["b"]), "--mode", "grounding")
    assert result.exit_code == 1
    assert "b.png: mode_not_supported" in result.stderr
    assert stub.requests == []

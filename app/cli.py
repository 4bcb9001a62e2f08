"""`lightonocr`: OCR files from a terminal, run the service, or show what it runs.

`ocr` runs the configured engine in this process (same settings as the service) or,
with `--server`, sends each file to a running service. Either way one output file
per input, and a failed file never stops the others: the exit code says whether
any failed (0: all written, 1: some failed, 2: bad usage or configuration).
Progress and messages go to stderr, so stdout stays clean for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from app import __version__
from app.errors import OCRError
from app.results import DocumentResult
from app.settings import Settings, SettingsError, get_settings

NDJSON = "application/x-ndjson"

cli = typer.Typer(
    name="lightonocr",
    help="LightOnOCR-2-1B: PDFs, scans and photos to markdown.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


class OutputFormat(StrEnum):
    MD = "md"
    JSON = "json"
    TXT = "txt"


class Failure(Exception):
    """One file could not be read; the message is shown as is."""


# -- txt output ------------------------------------------------------------------------

# Deliberately simple: drops markup, keeps words and reading order. Headings, emphasis, inline code,
# code fences, links and images (their text kept), blockquote markers, HTML tags and pipe-table rules go;
# table cells become tab-separated lines; list markers and LaTeX math stay as written.
_TXT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^\s*```[^\n]*$\n?", re.M), ""),
    (re.compile(r"<br\s*/?>", re.I), "\n"),
    (re.compile(r"[ \t]*</t[dh]>[ \t]*", re.I), "\t"),
    (re.compile(r"\s*</tr>\s*", re.I), "\n"),
    (re.compile(r"<[^>\n]+>"), ""),
    (re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$\n?", re.M), ""),
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.M), ""),
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.M), ""),
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])"), r"\1"),
    (re.compile(r"`([^`\n]+)`"), r"\1"),
]


def markdown_to_text(markdown: str) -> str:
    text = markdown
    for pattern, replacement in _TXT_RULES:
        text = pattern.sub(replacement, text)
    lines = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            line = "\t".join(cell.strip() for cell in stripped[1:-1].split("|"))
        lines.append(line.rstrip())
    text = html.unescape("\n".join(lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def render(result: DocumentResult, fmt: OutputFormat) -> str:
    if fmt is OutputFormat.JSON:
        return result.model_dump_json(indent=2) + "\n"
    if fmt is OutputFormat.TXT:
        return markdown_to_text(result.text)
    return result.text.rstrip("\n") + "\n"


# -- progress --------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Pages per second since the document started (pages finish in bursts, so no moving window)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = task.completed / elapsed if task.completed and elapsed else None
        return Text(f"{rate:.2f} pages/s" if rate else "- pages/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pages"),
        RateColumn(),
        TimeElapsedColumn(),
        console=err,
    )


# -- ocr -------------------------------------------------------------------------------


@dataclass
class Item:
    source: Path
    target: Path
    result: DocumentResult | None = None
    error: str | None = None


def _plan(files: list[Path], output_dir: Path, fmt: OutputFormat) -> list[Item]:
    items: list[Item] = []
    taken: dict[Path, Path] = {}
    for source in files:
        item = Item(source, output_dir / f"{source.stem}.{fmt.value}")
        if item.target in taken:
            item.error = f"its output {item.target} would overwrite the output of {taken[item.target]}"
        taken.setdefault(item.target, source)
        items.append(item)
    return items


async def _run_local(settings: Settings, items: list[Item], pages: str | None, password: str | None) -> None:
    from app.service import OCRService  # imported here: `info --server` and `--help` stay light

    service = OCRService(settings)
    err.print(f"Loading {escape(settings.model_name)} ({settings.model_source.value} engine)…")
    try:
        await service.start(wait=True)
    except Exception as exc:
        for item in items:
            item.error = item.error or f"the engine failed to start: {exc}"
        await service.close()
        return
    try:
        with _progress() as progress:
            for item in items:
                if item.error is not None:
                    continue
                task = progress.add_task(escape(item.source.name), total=None)
                try:
                    data = item.source.read_bytes()
                    async with service.admit(data, pages=pages, password=password) as job:
                        progress.update(task, total=job.total)
                        done = []
                        async with contextlib.aclosing(service.iter_pages(job)) as results:
                            async for page in results:
                                done.append(page)
                                progress.advance(task)
                    item.result = service.assemble(done)
                except OCRError as exc:
                    item.error = f"{exc.code}: {exc.message}"
                except OSError as exc:
                    item.error = f"cannot read it: {exc.strerror or exc}"
                if item.error is not None:
                    progress.remove_task(task)
    finally:
        await service.close()


def _error_of(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _post(
    client: httpx.Client, item: Item, data: bytes, form: dict[str, str], progress: Progress, task: TaskID
) -> DocumentResult:
    """POST one file; follow an NDJSON stream of events when the server sends one, else read plain JSON."""
    files = {"file": (item.source.name, data)}
    with client.stream("POST", "/api/inference", files=files, data=form, headers={"Accept": NDJSON}) as response:
        if response.status_code != 200:
            response.read()
            raise Failure(_error_of(response))
        if not response.headers.get("content-type", "").startswith(NDJSON):
            response.read()
            result = DocumentResult.model_validate_json(response.content)
            progress.update(task, total=len(result.pages), completed=len(result.pages))
            return result
        for line in response.iter_lines():
            if not line.strip():
                continue
            event: dict[str, Any] = json.loads(line)
            kind = event.get("event")
            if kind == "start":
                progress.update(task, total=event["total"])
            elif kind == "progress":
                progress.update(task, total=event["total"], completed=event["done"])
            elif kind == "result":
                return DocumentResult.model_validate(event["result"])
            elif kind == "error":
                error = event["error"]
                raise Failure(f"{error['code']}: {error['message']}")
    raise Failure("the server's stream ended without a result")


def _run_remote(server: str, api_key: str | None, items: list[Item], pages: str | None, password: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    form = {key: value for key, value in (("pages", pages), ("password", password)) if value}
    # No read timeout: the server bounds each request with REQUEST_TIMEOUT_S and streams as pages finish.
    timeout = httpx.Timeout(30.0, read=None)
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout) as client, _progress() as progress:
        for item in items:
            if item.error is not None:
                continue
            task = progress.add_task(escape(item.source.name), total=None)
            try:
                item.result = _post(client, item, item.source.read_bytes(), form, progress, task)
            except Failure as exc:
                item.error = str(exc)
            except OSError as exc:
                item.error = f"cannot read it: {exc.strerror or exc}"
            except httpx.HTTPError as exc:
                item.error = f"request to {server} failed: {exc}"
            except ValueError as exc:  # JSON or model validation
                item.error = f"unexpected answer from {server}: {exc}"
            if item.error is not None:
                progress.remove_task(task)


def _report(items: list[Item], fmt: OutputFormat) -> int:
    failed = 0
    for item in items:
        name = escape(str(item.source))
        if item.result is not None:
            try:
                item.target.write_text(render(item.result, fmt), encoding="utf-8")
            except OSError as exc:
                item.error = f"cannot write {item.target}: {exc.strerror or exc}"
        if item.result is None or item.error is not None:
            failed += 1
            err.print(f"[red]✗[/red] {name}: {escape(item.error or 'failed')}")
            continue
        result = item.result
        note = f"{len(result.pages)} pages"
        if result.status == "partial":
            odd = [f"{page.page} {page.status}" for page in result.pages if page.status not in ("ok", "retried")]
            note += f", partial: {', '.join(odd)}"
        mark = "[yellow]![/yellow]" if result.status == "partial" else "[green]✓[/green]"
        err.print(f"{mark} {name} → {escape(str(item.target))} ({escape(note)})")
    if failed:
        err.print(f"[red]{failed} of {len(items)} file(s) failed.[/red]")
    return 1 if failed else 0


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None


@cli.command()
def ocr(
    files: Annotated[list[Path], typer.Argument(help="PDFs or images to read.", show_default=False)],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where to write `<stem>.<format>` per input.")
    ] = Path("."),
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="md, json (the full result) or txt.")] = (
        OutputFormat.MD
    ),
    pages: Annotated[str | None, typer.Option(help="Pages to read in every file, e.g. `1-3,7` or `5-`.")] = None,
    password: Annotated[str | None, typer.Option(help="Password of encrypted PDFs.")] = None,
    server: Annotated[
        str | None, typer.Option(help="Send files to this running service (e.g. http://localhost:8000).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --server.")] = None,
) -> None:
    """OCR FILES into one markdown, JSON or text file each (in-process, or through --server)."""
    items = _plan(files, output_dir, fmt)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.print(f"[red]cannot create {escape(str(output_dir))}: {escape(exc.strerror or str(exc))}[/red]")
        raise typer.Exit(2) from None
    if server is not None:
        _run_remote(server, api_key, items, pages, password)
    else:
        settings = _settings()
        from app.logs import setup_logging

        setup_logging(settings.log_format.value, settings.log_level.value)
        asyncio.run(_run_local(settings, items, pages, password))
    raise typer.Exit(_report(items, fmt))


# -- serve and info --------------------------------------------------------------------


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on. Default: HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on. Default: PORT.")] = None,
) -> None:
    """Run the HTTP service with the current settings (SIGTERM: SHUTDOWN_GRACE_S for in-flight requests)."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "app.main:app",  # built by app.main, once, with these same (cached) settings
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,  # app.logs formats every line, uvicorn's included
        access_log=False,  # the service writes its own access log (app.access)
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )


def _local_info(settings: Settings) -> dict[str, Any]:
    from app.engines import build_engine  # builds the engine object only: no weights are loaded

    engine = build_engine(settings).info()
    info: dict[str, Any] = {
        "name": settings.project_name,
        "version": __version__,
        "engine": engine.engine,
        "model": engine.model,
        "model_version": settings.model_version,
        "device": engine.device,
        "sampling": {"temperature": settings.temperature, "top_p": settings.top_p},
        "retry_temperatures": settings.retry_temperatures,
        "limits": {
            "max_file_size_mb": settings.max_file_size_mb,
            "max_pages": settings.max_pages,
            "max_image_pixels": settings.max_image_pixels,
            "max_new_tokens": settings.max_new_tokens,
            "max_queued_pages": settings.max_queued_pages,
            "request_timeout_s": settings.request_timeout_s,
        },
        "api_keys": "on" if settings.load_api_keys() else "off",
        "logs": f"{settings.log_format.value}, {settings.log_level.value}",
        "listen": f"{settings.host}:{settings.port}",
    }
    if engine.engine == "vllm":
        info["vllm"] = {"base_url": settings.vllm_base_url, "max_concurrent_pages": settings.max_concurrent_pages}
    else:
        info["huggingface"] = {"cache_dir": str(settings.model_cache_dir), "max_batch_size": settings.hf_max_batch_size}
    return info


def _remote_info(server: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{server.rstrip('/')}/info", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        err.print(f"[red]request to {escape(server)} failed: {escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    if response.status_code != 200:
        err.print(f"[red]{escape(_error_of(response))}[/red]")
        raise typer.Exit(1)
    info: dict[str, Any] = response.json()
    return info


def _rows(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_rows(value, f"{prefix}{key}."))
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            rows.append((prefix + key, shown))
    return rows


@cli.command()
def info(
    server: Annotated[str | None, typer.Option(help="Show a running service's /info instead.")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --server.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the engine, model, device and the settings that matter (without loading the model)."""
    data = _remote_info(server, api_key) if server is not None else _local_info(_settings())
    if as_json:
        out.print_json(data=data)
        return
    table = Table(show_header=False, box=None)
    for key, value in _rows(data):
        table.add_row(f"[bold]{escape(key)}[/bold]", escape(value))
    out.print(table)


def main() -> None:
    cli()

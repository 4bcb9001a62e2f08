"""`lightonocr`: OCR files from a terminal, run the service, or show what it runs.

`ocr` runs the configured engine in this process (same settings as the service) or,
with `--server`, sends each file to a running service. Either way one output file
per input, and a failed file never stops the others: the exit code says whether
any failed (0: all written, 1: some failed, 2: bad usage or configuration).
Progress and messages go to stderr, so stdout stays clean for scripts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
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
from typer._click.core import Context  # typer 0.29 vendors click: its own types
from typer._click.formatting import HelpFormatter
from typer.core import TyperArgument, TyperCommand, TyperOption

from app import __version__
from app.errors import OCRError
from app.events import ErrorEvent, ProgressEvent, ResultEvent, StartEvent, parse_event
from app.profiles import active_profile
from app.results import DocumentResult, ReadOptions
from app.settings import Settings, SettingsError, get_settings, short_model_name
from app.text import markdown_to_text

NDJSON = "application/x-ndjson"
log = logging.getLogger("app.cli")

cli = typer.Typer(
    name="lightonocr",
    help="LightOnOCR-2-1B: PDFs, scans and photos to markdown.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: words for values (FILE, DIR, N), not Python types
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


class PlainCommand(TyperCommand):
    """Help that names arguments by their metavar alone: `FILE|DIR...`, not `{FILE|DIR...}... <list[Path]>`."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar or "[OPTIONS]"]
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar or (param.name or "").upper())
        return pieces

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        arguments = [
            (param.metavar or (param.name or "").upper(), param.help or "")
            for param in self.get_params(ctx)
            if isinstance(param, TyperArgument)
        ]
        options = [
            record
            for param in self.get_params(ctx)
            if isinstance(param, TyperOption) and (record := param.get_help_record(ctx)) is not None
        ]
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


def _show_version(value: bool) -> None:
    if value:
        out.print(f"lightonocr {__version__}", highlight=False)
        raise typer.Exit()


@cli.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """LightOnOCR-2-1B: PDFs, scans and photos to markdown."""


class OutputFormat(StrEnum):
    MD = "md"
    JSON = "json"
    TXT = "txt"


class ModeChoice(StrEnum):
    PLAIN = "plain"
    GROUNDING = "grounding"


class ImagesChoice(StrEnum):
    NONE = "none"
    INLINE = "inline"


class Failure(Exception):
    """One file could not be read; the message is shown as is."""


def render(result: DocumentResult, fmt: OutputFormat) -> str:
    if fmt is OutputFormat.JSON:
        return result.model_dump_json(indent=2) + "\n"
    if fmt is OutputFormat.TXT:
        return markdown_to_text(result.text) or "\n"
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

# What a directory argument reads: files whose first bytes say PDF or image (the service's own sniffing).
SNIFF_BYTES = 1024
INTERRUPTED = 130  # 128 + SIGINT, as shells report it


@dataclass
class Item:
    source: Path
    target: Path
    result: DocumentResult | None = None
    error: str | None = None
    written: bool = False


def _supported(path: Path) -> bool:
    """Whether `path` starts like a PDF or an image, judged by magic bytes as the service judges uploads."""
    from app.intake.sniff import sniff  # imported here: `--help` stays light

    try:
        with path.open("rb") as handle:
            sniff(handle.read(SNIFF_BYTES))
    except (OCRError, OSError):
        return False
    return True


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for the PDFs and images directly inside it, by name."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)  # read as asked: a missing or unsupported file is reported as that file's failure
            continue
        inside = sorted(child for child in path.iterdir() if child.is_file())
        found = [child for child in inside if _supported(child)]
        skipped = [child.name for child in inside if child not in found]
        note = f"; skipped {len(skipped)} that are not PDFs or images: {', '.join(skipped)}" if skipped else ""
        err.print(escape(f"{path}: {len(found)} file(s) to read{note}"))
        files.extend(found)
    return files


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


def _write(item: Item, text: str) -> None:
    """Write through a temporary file, so an interrupted run never leaves half an output behind."""
    partial_file = item.target.with_name(f".{item.target.name}.part")
    try:
        partial_file.write_text(text, encoding="utf-8")
        partial_file.replace(item.target)
    except OSError as exc:
        partial_file.unlink(missing_ok=True)
        item.error = f"cannot write {item.target}: {exc.strerror or exc}"
        return
    item.written = True


def _page_numbers(numbers: list[int]) -> str:
    """`page 4`, `pages 2, 5`, `pages 1-60, 62`: runs of three or more as ranges, so long documents stay short."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return f"{'pages' if len(numbers) > 1 else 'page'} {', '.join(parts)}"


def _pages_note(result: DocumentResult) -> str:
    """`3 pages`, or `3 pages, partial: pages 1, 2 truncated; page 3 failed` (numbers, not counts)."""
    note = f"{len(result.pages)} page{'' if len(result.pages) == 1 else 's'}"
    by_status: dict[str, list[int]] = {}
    for page in result.pages:
        if page.status not in ("ok", "retried"):
            by_status.setdefault(page.status, []).append(page.page)
    if by_status:
        parts = [f"{_page_numbers(numbers)} {status}" for status, numbers in by_status.items()]
        note += f", {result.status}: {'; '.join(parts)}"
    return note


async def _finish(item: Item, fmt: OutputFormat) -> None:
    """Write this file's output and say so now, whatever happens to the files still running."""
    name = escape(str(item.source))
    if item.result is not None and item.error is None:
        await asyncio.to_thread(_write, item, render(item.result, fmt))
    if item.result is None or item.error is not None:
        err.print(f"[red]✗[/red] {name}: {escape(item.error or 'failed')}")
        return
    mark = "[yellow]![/yellow]" if item.result.status == "partial" else "[green]✓[/green]"
    err.print(f"{mark} {name} → {escape(str(item.target))} ({escape(_pages_note(item.result))})")


# Reads one file and returns its result; raises `Failure` with the message to show.
ReadOne = Callable[[Item, Progress, TaskID], Awaitable[DocumentResult]]


async def _read_all(items: list[Item], read_one: ReadOne, fmt: OutputFormat, jobs: int) -> None:
    """Read up to `jobs` files at once; each is written and reported as soon as it is done."""
    semaphore = asyncio.Semaphore(jobs)

    async def one(item: Item) -> None:
        async with semaphore:
            task = progress.add_task(escape(item.source.name), total=None)
            try:
                item.result = await read_one(item, progress, task)
            except Failure as exc:
                item.error = str(exc)
            except OSError as exc:
                item.error = f"cannot read it: {exc.strerror or exc}"
            except Exception as exc:  # a bug must not take the other files down with it
                log.debug("reading %s failed", item.source, exc_info=True)
                item.error = f"unexpected error: {exc!r}"
            finally:
                progress.remove_task(task)
            await _finish(item, fmt)

    with _progress() as progress:
        for item in items:
            if item.error is not None:
                await _finish(item, fmt)
        async with asyncio.TaskGroup() as group:
            for item in items:
                if item.error is None:
                    group.create_task(one(item), name=f"read {item.source}")


def _in_process(settings: Settings) -> Settings:
    """The admission limits share a service between clients; here `--jobs` bounds the work instead."""
    return settings.model_copy(
        update={
            "max_queued_pages": 2**31,
            "key_max_pages_in_flight": None,
            "rate_limit_pages_per_min": None,
            "model_load_retry_s": 0,  # a command fails at once when the model cannot load; a server retries
        }
    )


async def _run_local(
    settings: Settings,
    items: list[Item],
    pages: str | None,
    password: str | None,
    fmt: OutputFormat,
    jobs: int,
    options: ReadOptions,
) -> None:
    from app.allocator import tune_allocator
    from app.service import OCRService  # imported here: `info --server` and `--help` stay light

    tune_allocator()  # the service's malloc setting: long PDFs read in-process stay bounded too
    service = OCRService(_in_process(settings))
    err.print(f"Loading {escape(settings.model_name)} ({settings.model_source.value} engine)…")
    try:
        try:
            await service.start(wait=True)
        except Exception as exc:
            for item in items:
                item.error = item.error or f"the engine failed to start: {exc}"
            for item in items:
                await _finish(item, fmt)
            return

        async def read_one(item: Item, progress: Progress, task: TaskID) -> DocumentResult:
            """One file through the shared service: pages of every file in flight share the engine."""
            data = await asyncio.to_thread(item.source.read_bytes)
            try:
                async with service.admit(data, pages=pages, password=password, options=options) as admitted:
                    progress.update(task, total=admitted.total)
                    # No REQUEST_TIMEOUT_S here: a terminal run may take as long as its document needs.
                    return await service.run(admitted, on_page=lambda _: progress.advance(task), request_timeout=False)
            except OCRError as exc:
                raise Failure(f"{exc.code}: {exc.message}") from None

        await _read_all(items, read_one, fmt, jobs)
    finally:
        await service.close()


def _error_of(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


# A busy service (429/503 with Retry-After) is asked again this many times, waiting as it says (capped).
BUSY_RETRIES = 5
BUSY_WAIT_CAP_S = 30.0


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    try:
        return min(max(float(response.headers["retry-after"]), 0.0), BUSY_WAIT_CAP_S)
    except (KeyError, ValueError):
        return None


async def _post(
    client: httpx.AsyncClient, item: Item, data: bytes, form: dict[str, str], progress: Progress, task: TaskID
) -> DocumentResult:
    """POST one file; follow an NDJSON stream of events when the server sends one, else read plain JSON."""
    files = {"file": (item.source.name, data)}
    for attempt in range(BUSY_RETRIES + 1):
        async with client.stream(
            "POST", "/api/inference", files=files, data=form, headers={"Accept": NDJSON}
        ) as response:
            if response.status_code != 200:
                await response.aread()
                wait = _retry_after(response)
                if wait is None or attempt == BUSY_RETRIES:
                    raise Failure(_error_of(response))
                log.debug("%s: %s; asking again in %.0f s", item.source, _error_of(response), wait)
                await asyncio.sleep(wait)
                continue
            if not response.headers.get("content-type", "").startswith(NDJSON):
                await response.aread()
                result = DocumentResult.model_validate_json(response.content)
                progress.update(task, total=len(result.pages), completed=len(result.pages))
                return result
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = parse_event(line)  # the server's own event models (app/events.py)
                if isinstance(event, StartEvent):
                    progress.update(task, total=event.total)
                elif isinstance(event, ProgressEvent):
                    progress.update(task, total=event.total, completed=event.done)
                elif isinstance(event, ResultEvent):
                    return event.result
                elif isinstance(event, ErrorEvent):
                    raise Failure(f"{event.error.code}: {event.error.message}")
            raise Failure("the server's stream ended without a result")
    raise AssertionError("unreachable")


async def _run_remote(
    server: str,
    api_key: str | None,
    items: list[Item],
    pages: str | None,
    password: str | None,
    fmt: OutputFormat,
    jobs: int,
    options: ReadOptions,
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    form = {key: value for key, value in (("pages", pages), ("password", password)) if value}
    if options != ReadOptions():  # only what differs from the defaults: an older server still takes the rest
        form.update(mode=options.mode, images=options.images)
        form["drop_headers_footers"] = "true" if options.drop_headers_footers else "false"
    # No read timeout: the server bounds each request with REQUEST_TIMEOUT_S and streams as pages finish.
    timeout = httpx.Timeout(30.0, read=None)
    limits = httpx.Limits(max_connections=jobs)
    async with httpx.AsyncClient(base_url=server, headers=headers, timeout=timeout, limits=limits) as client:

        async def read_one(item: Item, progress: Progress, task: TaskID) -> DocumentResult:
            """One file, one request: `jobs` of them in flight at once."""
            data = await asyncio.to_thread(item.source.read_bytes)
            try:
                return await _post(client, item, data, form, progress, task)
            except httpx.HTTPError as exc:
                raise Failure(f"request to {server} failed: {exc}") from None
            except ValueError as exc:  # JSON or model validation
                raise Failure(f"unexpected answer from {server}: {exc}") from None

        await _read_all(items, read_one, fmt, jobs)


def _summary(items: list[Item]) -> int:
    failed = sum(1 for item in items if not item.written)
    if failed:
        err.print(f"[red]{failed} of {len(items)} file(s) failed.[/red]")
    return 1 if failed else 0


def _interrupted(items: list[Item]) -> int:
    """Ctrl-C: say what was written and what was not; outputs already written stay."""
    written = [item for item in items if item.written]
    missing = [str(item.source) for item in items if not item.written]
    err.print(f"[yellow]Interrupted: {len(written)} of {len(items)} file(s) written.[/yellow]")
    if missing:
        err.print(escape(f"Not written: {', '.join(missing)}"))
    return INTERRUPTED


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None


def _server_url(server: str) -> str:
    """`host:port` means `http://host:port`; only http and https are spoken."""
    url = server.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        err.print(f"[red]--server {escape(server)}: expected host:port or an http(s):// URL[/red]")
        raise typer.Exit(2)
    return url


def _password(password: str | None, password_file: Path | None) -> str | None:
    """The password from its file (first line; the file is not shown by `ps`), else from --password."""
    if password_file is None:
        return password
    try:
        lines = password_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        err.print(f"[red]cannot read --password-file {escape(str(password_file))}: {escape(exc.strerror or str(exc))}")
        raise typer.Exit(2) from None
    return lines[0] if lines else ""


def _log_level(settings: Settings) -> str:
    """WARNING unless LOG_LEVEL is set: per-page and retry lines would bury the progress bars."""
    return settings.log_level.value if "log_level" in settings.model_fields_set else "WARNING"


ServerOption = Annotated[
    str | None,
    typer.Option(
        envvar="LIGHTONOCR_SERVER",
        metavar="URL",
        help="A running service to use: host:port (http) or an http(s):// URL.",
        show_envvar=True,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        envvar="LIGHTONOCR_API_KEY",
        metavar="KEY",
        help="API key for --server (better from the environment: arguments show in `ps`).",
        show_envvar=True,
    ),
]


@cli.command(cls=PlainCommand)
def ocr(
    files: Annotated[
        list[Path],
        typer.Argument(
            metavar="FILE|DIR...",
            help="PDFs or images; a directory reads the PDFs and images directly inside it.",
            show_default=False,
        ),
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", metavar="DIR", help="Where to write <stem>.<format> per input.")
    ] = Path("."),
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="md, json (the full result) or txt.")] = (
        OutputFormat.MD
    ),
    pages: Annotated[
        str | None, typer.Option(metavar="PAGES", help="Pages to read in every file, e.g. 1-3,7 or 5-.")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", min=1, help="Files read at once.")] = 4,
    password: Annotated[
        str | None, typer.Option(metavar="PASSWORD", help="Password of encrypted PDFs (shows in `ps`).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Read the password of encrypted PDFs from the first line of FILE."),
    ] = None,
    mode: Annotated[
        ModeChoice,
        typer.Option(help="plain: markdown. grounding (LightOnOCR-3 models): blocks with labels and boxes (json)."),
    ] = ModeChoice.PLAIN,
    drop_headers_footers: Annotated[
        bool,
        typer.Option(
            "--drop-headers-footers",
            help="Grounding: leave headers, footers, page numbers and footnotes out of the markdown.",
        ),
    ] = False,
    images: Annotated[
        ImagesChoice,
        typer.Option(help="inline: each picture with a box carries its crop as a data URL (json)."),
    ] = ImagesChoice.NONE,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """OCR files into one markdown, JSON or text file each (in-process, or through --server).

    Each output is written as soon as its file is done; Ctrl-C keeps those and lists the rest.
    """
    password = _password(password, password_file)
    options = ReadOptions(mode=mode.value, drop_headers_footers=drop_headers_footers, images=images.value)
    url = _server_url(server) if server else None
    items = _plan(_expand(files), output_dir, fmt)
    if not items:
        err.print("[red]nothing to read: no PDFs or images in the given directories[/red]")
        raise typer.Exit(2)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.print(f"[red]cannot create {escape(str(output_dir))}: {escape(exc.strerror or str(exc))}[/red]")
        raise typer.Exit(2) from None
    try:
        if url is not None:
            asyncio.run(_run_remote(url, api_key, items, pages, password, fmt, jobs, options))
        else:
            settings = _settings()
            from app.logs import setup_logging

            setup_logging(settings.log_format.value, _log_level(settings))
            asyncio.run(_run_local(settings, items, pages, password, fmt, jobs, options))
    except KeyboardInterrupt:
        raise typer.Exit(_interrupted(items)) from None
    raise typer.Exit(_summary(items))


# -- serve and info --------------------------------------------------------------------


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(metavar="ADDRESS", help="Address to listen on. Default: HOST.")] = None,
    port: Annotated[int | None, typer.Option(metavar="PORT", help="Port to listen on. Default: PORT.")] = None,
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
    profile = active_profile(settings)
    info: dict[str, Any] = {
        "name": settings.project_name,
        "version": __version__,
        "engine": engine.engine,
        "model": engine.model,
        "model_version": short_model_name(engine.model),
        "device": engine.device,
        "sampling": {"temperature": profile.temperature, "top_p": profile.top_p},
        "retry_temperatures": settings.retry_temperatures,
        "profile": profile.describe(),
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
    if engine.engine in ("vllm", "openai"):
        from app.engines.fleet import display_url  # credentials stay out of a terminal and its scrollback

        servers = [display_url(url.strip()) for url in settings.vllm_base_url.split(",") if url.strip()]
        info["vllm"] = {"base_url": ",".join(servers), "max_concurrent_pages": settings.max_concurrent_pages}
    else:
        info["huggingface"] = {"cache_dir": str(settings.model_cache_dir), "max_batch_size": settings.hf_max_batch_size}
    return info


def _remote_info(server: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{server}/info", headers=headers, timeout=30)
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
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the engine, model, device and the settings that matter (without loading the model).

    With --server (or LIGHTONOCR_SERVER), a running service's /info instead.
    """
    data = _remote_info(_server_url(server), api_key) if server else _local_info(_settings())
    if as_json:
        out.print_json(data=data)
        return
    table = Table(show_header=False, box=None)
    for key, value in _rows(data):
        table.add_row(f"[bold]{escape(key)}[/bold]", escape(value))
    out.print(table)


def main() -> None:
    cli()

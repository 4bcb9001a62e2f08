"""ASGI entry point: `uvicorn app.main:app`.

Building the app reads and validates settings but loads nothing heavy; the
engine starts in the lifespan, in the background, so `/health` answers while
the weights load and `/ready` turns 200 once they are in.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app import __version__
from app.admission import SharedAdmission
from app.allocator import tune_allocator
from app.api.errors import finish_cut_requests, install_error_handlers
from app.api.jobs import router as jobs_router
from app.api.middleware import RequestMiddleware
from app.api.openapi import document_validation_errors, edit_openapi, error_table
from app.api.routes import router
from app.api.security import ApiKeyMiddleware, is_open
from app.api.upload import LINGER_MIN_BYTES, LingeringClose
from app.engines import Engine
from app.intake.pool import IntakePool
from app.jobs import JobRunner, WebhookSender
from app.jobs.events import NotifyListener
from app.jobs.limits import PostgresLimits
from app.jobs.outbox import Outbox
from app.jobs.store import JobStore, PostgresJobStore
from app.jobs.store.postgres import NOTIFY_CHANNEL, WORK_CHANNEL
from app.logs import setup_logging
from app.metrics import Metrics
from app.service import OCRService
from app.settings import Settings, SettingsError, check_jobs_db, get_settings
from app.web import install_web

log = logging.getLogger(__name__)


def shared_limits(service: OCRService, store: JobStore, replica: str, settings: Settings) -> SharedAdmission | None:
    """With PostgreSQL, per-key limits count every replica's pages (`SharedAdmission` on the store's pool)."""
    if not isinstance(store, PostgresJobStore):
        return None  # SQLite: one host, one worker process; the in-process counts are the whole truth
    limits = PostgresLimits(store.pool)
    shared = SharedAdmission.like(service.admission, limits, replica=replica, lease_s=settings.job_lease_s)
    service.admission = shared
    return shared


def notify_listener(jobs: JobRunner) -> NotifyListener | None:
    """With PostgreSQL, followers of a job hear of pages stored by any replica at once, and an idle runner of
    pages submitted to (or given back by) any replica (LISTEN/NOTIFY)."""
    if not isinstance(jobs.store, PostgresJobStore):
        return None
    handlers = {NOTIFY_CHANNEL: jobs.feed.notify, WORK_CHANNEL: lambda _: jobs.notify()}
    return NotifyListener(jobs.store.conninfo, handlers)


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, intake: IntakePool | None = None
) -> FastAPI:
    """The app; `engine` and `intake` (a worker pool the caller owns) replace the ones settings would build."""
    settings = settings if settings is not None else get_settings()
    setup_logging(settings.log_format.value, settings.log_level.value)
    if settings.unknown_env_file_keys:
        log.warning(
            ".env: ignoring %s: no such setting (names as in .env.example; .env is not exported to the environment)",
            ", ".join(settings.unknown_env_file_keys),
        )
    check_jobs_db(settings.jobs_db)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = OCRService(settings, engine, metrics, intake)
        app.state.service = service
        await service.start()
        jobs = JobRunner.from_settings(settings, service)
        app.state.jobs = jobs
        outbox = Outbox(jobs.store, WebhookSender.from_settings(settings))
        jobs.feed.on_end(lambda _: outbox.notify())
        app.state.outbox = outbox
        shared: SharedAdmission | None = None
        listener: NotifyListener | None = None
        try:
            await jobs.store.open()  # the PostgreSQL pool exists from here: the limits, outbox and events use it
            shared = shared_limits(service, jobs.store, outbox.worker, settings)
            if shared is not None:
                await shared.start()
            listener = notify_listener(jobs)
            if listener is not None:
                await listener.start()
            await jobs.start()  # after the engine starts: resumes unfinished jobs
            await outbox.start()  # webhooks of jobs finished here or by any replica, dead ones included
            yield
        finally:
            await finish_cut_requests(app)  # requests cut past the grace period answer 503 shutting_down
            await outbox.stop()
            if listener is not None:
                await listener.stop()
            if shared is not None:
                await shared.stop()
            await jobs.stop()  # before the engine closes; running jobs stay `running` and resume next start
            await service.close()

    app = FastAPI(
        title=settings.project_name,
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # our own /docs below: Swagger UI from the package, not a CDN
        redoc_url=None,  # ReDoc would load from a CDN and Google Fonts; /docs covers it
    )
    install_error_handlers(app)
    document_validation_errors(app)
    app.include_router(router)
    app.include_router(jobs_router)  # /api/jobs
    install_web(app)  # GET /, /static/*, POST /web/render
    keys = settings.load_api_keys()
    _install_docs(app, bearer=bool(keys))
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    # Outside the key check, so a 401 to a big upload reaches the client too.
    app.add_middleware(LingeringClose, max_bytes=max(4 * settings.max_file_bytes, LINGER_MIN_BYTES))
    app.add_middleware(RequestMiddleware, metrics=metrics, routes=app.routes)  # request id, metrics, access log
    # Added last, so outermost: even a 401 carries CORS headers a browser can read.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID", "Location"],
        )
    return app


DESCRIPTION = (
    "OCR for PDFs, scans and photos into clean markdown with LightOnOCR-2-1B.\n\n"
    "**Keys.** When API keys are configured, every route but `/health` and `/ready` needs "
    "`Authorization: Bearer <key>` (these docs, `/openapi.json` and the web page open without one; "
    "use **Authorize** to send it from here).\n\n"
    "**Request ids.** Send `X-Request-ID` (printable ASCII, at most 128 characters) or get a generated one; "
    "it is returned in the `X-Request-ID` header and stamped on every log line of the request.\n\n"
    '**Errors** all have the shape `{"error": {"code", "message", "details"?}}`; branch on `code`:\n\n' + error_table()
)


SWAGGER_ASSETS = "/static/vendor/swagger-ui"  # vendored from npm (app/web/static/vendor/VENDOR.md)


def _install_docs(app: FastAPI, *, bearer: bool) -> None:
    """Swagger UI at /docs from vendored assets, so it renders offline; open without a key, like /openapi.json.

    Neither holds data (app.api.security); the calls made from the page still need the key, which
    Swagger UI's "Authorize" button sends as `Authorization: Bearer` when keys are on.
    """

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=prefix + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - API docs",
            swagger_js_url=f"{prefix}{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{SWAGGER_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=None,
            # Swagger UI would otherwise send the schema to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )

    if bearer:
        _document_bearer_auth(app)


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the Bearer key in the OpenAPI schema: Swagger UI then shows "Authorize" and sends the key."""

    def declare(schema: dict[str, Any]) -> None:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["ApiKey"] = {"type": "http", "scheme": "bearer", "description": "One of API_KEYS / API_KEYS_FILE."}
        schema["security"] = [{"ApiKey": []}]
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if is_open(path, method.upper()):
                    operation["security"] = []  # the probes

    edit_openapi(app, declare)


# uvicorn's exit status for "failed before serving": its `--workers` supervisor stops
# instead of restarting a worker that would fail the same way forever.
STARTUP_FAILURE = 3


def uvicorn_workers() -> int:
    """Worker processes of the uvicorn importing this module: its `Config` is a local of a calling frame.

    1 when not imported by uvicorn (tests, `lightonocr serve`, which never runs more than one).
    """
    try:
        from uvicorn import Config
    except ImportError:  # pragma: no cover - uvicorn is a dependency
        return 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, Config):  # with --reload uvicorn runs one process, whatever --workers says
                return 1 if value.reload else max(value.workers or 1, 1)
        frame = frame.f_back
    return 1


def refuse_several_workers(workers: int) -> None:
    """One worker per process: scale with replicas.

    Each uvicorn worker is a separate process: with the HF engine each would load its own copy
    of the model, and each keeps its own /metrics (scrapes would alternate between them and the
    counters go backwards), queue bound, per-key and rate limits.
    """
    if workers > 1:
        raise SettingsError(
            f"--workers {workers}: run one worker per process (each worker would load its own model and keep its "
            "own metrics and limits); scale with replicas behind a load balancer instead (README, Operations)"
        )


tune_allocator()  # the Docker image's MALLOC_MMAP_THRESHOLD_, whatever starts the service
try:
    refuse_several_workers(uvicorn_workers())
    app = create_app()
except SettingsError as exc:  # a clean message naming the variables, not a traceback
    sys.stderr.write(f"LightOnOCR Service cannot start: {exc}\n")
    sys.stderr.flush()
    raise SystemExit(STARTUP_FAILURE) from None

"""ASGI entry point: `uvicorn app.main:app`.

Building the app reads and validates settings but loads nothing heavy; the
engine starts in the lifespan, in the background, so `/health` answers while
the weights load and `/ready` turns 200 once they are in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api.errors import install_error_handlers
from app.api.routes import router
from app.api.security import ApiKeyMiddleware
from app.engines import Engine
from app.service import OCRService
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = OCRService(settings, engine)
        app.state.service = service
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title=settings.project_name,
        version=__version__,
        description="OCR for PDFs, scans and photos into clean markdown with LightOnOCR-2-1B.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    keys = settings.load_api_keys()
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
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


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)
app = create_app()

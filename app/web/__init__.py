"""The web page: `GET /`, its static assets under `/static`, and the page-image helper `POST /web/render`."""

from __future__ import annotations

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.web.routes import RENDER_THREADS, STATIC_DIR, router

STATIC_PREFIX = "/static"


def install_web(app: FastAPI) -> None:
    """Serve the page and its assets (from the package, so a wheel or image carries them)."""
    app.include_router(router)
    app.state.web_render_limiter = anyio.CapacityLimiter(RENDER_THREADS)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["STATIC_PREFIX", "install_web"]

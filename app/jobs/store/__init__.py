"""Durable job state: the `JobStore` protocol (`base`), on SQLite (`sqlite`, the embedded default) or
PostgreSQL (`postgres`, shared by replicas), with versioned migrations (`migrations`).

`open_store(settings)` picks the store from JOBS_DB: a `postgresql://` URL or a file path.
"""

from __future__ import annotations

from pathlib import Path

from app.jobs.store.base import (
    TERMINAL,
    Completion,
    JobRecord,
    JobStatus,
    JobStore,
    Lease,
    NewJob,
    SqlJobStore,
    WebhookState,
)
from app.jobs.store.postgres import PostgresJobStore, hide_password, is_postgres_url
from app.jobs.store.sqlite import SqliteJobStore
from app.settings import Settings


def open_store(settings: Settings) -> SqlJobStore:
    """The store JOBS_DB names (not connected yet: `await store.open()`)."""
    ttl_s, max_bytes = settings.jobs_ttl_hours * 3600, settings.jobs_max_bytes
    if is_postgres_url(settings.jobs_db):
        return PostgresJobStore(
            settings.jobs_db,
            ttl_s=ttl_s,
            max_bytes=max_bytes,
            pool_size=settings.jobs_db_pool_size,
            retry_after_s=settings.retry_after_s,
        )
    return SqliteJobStore(Path(settings.jobs_db), ttl_s=ttl_s, max_bytes=max_bytes)


__all__ = [
    "TERMINAL",
    "Completion",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "Lease",
    "NewJob",
    "PostgresJobStore",
    "SqlJobStore",
    "SqliteJobStore",
    "WebhookState",
    "hide_password",
    "is_postgres_url",
    "open_store",
]

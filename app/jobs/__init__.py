"""Durable jobs: documents queued in SQLite or PostgreSQL, run page by page by every process, resumed after a crash.

`store` keeps jobs, documents, page leases and finished pages (storage only); `views` is how
a job is shown (summary, detail); `runner` runs them through `OCRService`;
`webhooks` tells a callback URL when a job ends. None of them
imports FastAPI: `app/api/jobs.py` is the HTTP face.
"""

from app.jobs.runner import JobRunner
from app.jobs.store import JobRecord, JobStore, Lease, NewJob, PostgresJobStore, SqliteJobStore, open_store
from app.jobs.views import JobDetail, JobSummary, summarize
from app.jobs.webhooks import WebhookSender, sign, validate_callback_url, verify

__all__ = [
    "JobDetail",
    "JobRecord",
    "JobRunner",
    "JobStore",
    "JobSummary",
    "Lease",
    "NewJob",
    "PostgresJobStore",
    "SqliteJobStore",
    "WebhookSender",
    "open_store",
    "sign",
    "summarize",
    "validate_callback_url",
    "verify",
]

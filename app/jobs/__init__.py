"""Durable jobs: documents queued in SQLite, run in the background, resumed after a crash.

`store` keeps jobs, documents and finished pages (storage only); `views` is how
a job is shown (summary, detail); `runner` runs them through `OCRService`;
`webhooks` tells a callback URL when a job ends. None of them
imports FastAPI: `app/api/jobs.py` is the HTTP face.
"""

from app.jobs.runner import JobRunner
from app.jobs.store import JobRecord, JobStore, NewJob, SqliteJobStore
from app.jobs.views import JobDetail, JobSummary, summarize
from app.jobs.webhooks import WebhookSender, sign, validate_callback_url, verify

__all__ = [
    "JobDetail",
    "JobRecord",
    "JobRunner",
    "JobStore",
    "JobSummary",
    "NewJob",
    "SqliteJobStore",
    "WebhookSender",
    "sign",
    "summarize",
    "validate_callback_url",
    "verify",
]

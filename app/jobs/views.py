"""How a job is shown: its summary (the listing, the webhook body) and its detail (the summary plus pages).

Kept apart from storage (`app/jobs/store.py`) so a second `JobStore` implementation reuses them unchanged;
no FastAPI here either: the runner sends the summary as the webhook payload.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from app.jobs.store import JobRecord, JobStatus, WebhookState
from app.results import PageResult


class JobError(BaseModel):
    code: str = Field(description="Stable machine-readable code, as in the API's errors.", examples=["document_failed"])
    message: str = Field(description="What went wrong, for people.")
    details: dict[str, Any] | None = Field(default=None, description="Machine-readable facts, when there are any.")


class WebhookStatus(BaseModel):
    state: WebhookState = Field(description="`pending`, `delivered`, or `failed` (attempts exhausted or a 4xx).")
    attempts: int = Field(description="Delivery attempts made so far.")


class JobWaiting(BaseModel):
    code: str = Field(
        description="Why the job cannot move now, e.g. `engine_unavailable`.", examples=["engine_unavailable"]
    )
    message: str = Field(description="What is happening, for people.")
    since: datetime = Field(description="When the job started waiting (UTC).")


class JobSummary(BaseModel):
    """A job without its pages: the listing, the webhook body."""

    id: str = Field(description="The job's id, as in `Location: /api/jobs/{id}`.")
    status: JobStatus = Field(
        description="`queued`, `running`, then `succeeded` (every page ok or retried), `partial` (some page "
        "truncated, repetitive or failed), `failed` (see `error`) or `cancelled`."
    )
    pages_done: int = Field(description="Pages finished (failed pages included).")
    pages_total: int = Field(description="Pages this job reads.")
    page_numbers: list[int] = Field(description="The document's pages this job reads (1-based), in order.")
    eta_s: float | None = Field(description="Seconds left at this run's measured page rate; null until a page ends.")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    updated_at: datetime = Field(description="Last change: status or a finished page (UTC).")
    finished_at: datetime | None = Field(description="When the job ended (UTC); null while queued or running.")
    expires_at: datetime | None = Field(description="When the job and its results are deleted (JOBS_TTL_HOURS).")
    error: JobError | None = Field(default=None, description="Why the job failed; null unless `failed`.")
    waiting: JobWaiting | None = Field(
        default=None,
        description="Set while a queued or running job waits (the engine is unreachable, or a per-client limit): "
        "why, and since when; the job resumes by itself. Null once a page finishes or the job ends.",
    )
    webhook: WebhookStatus | None = Field(default=None, description="Delivery to callback_url, when one was given.")


class JobDetail(JobSummary):
    pages: list[PageResult] = Field(description="Finished pages so far, in page order.")


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def summarize(record: JobRecord, now: float) -> JobSummary:
    return JobSummary(
        id=record.id,
        status=record.status,
        pages_done=record.pages_done,
        pages_total=record.pages_total,
        page_numbers=record.pages,
        eta_s=record.eta_s(now),
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        updated_at=datetime.fromtimestamp(record.updated_at, UTC),
        finished_at=_time(record.finished_at),
        expires_at=_time(record.expires_at),
        error=JobError.model_validate(record.error) if record.error else None,
        waiting=_waiting(record.waiting),
        webhook=WebhookStatus(state=record.webhook, attempts=record.webhook_attempts) if record.webhook else None,
    )


def _waiting(waiting: dict[str, Any] | None) -> JobWaiting | None:
    if waiting is None:
        return None
    since = datetime.fromtimestamp(waiting["since"], UTC)
    return JobWaiting(code=waiting["code"], message=waiting["message"], since=since)

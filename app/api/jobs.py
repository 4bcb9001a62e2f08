"""Durable jobs over HTTP: submit a document, poll it, fetch its result, cancel it.

Everything a job will be refused for is checked at submit time (type,
password, pages, MAX_PAGES, admission limits, storage), so a 202 means the
job will run. With API keys on, a job belongs to the key that submitted it:
other keys get 404 for it, as for an unknown id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from app.api.deps import Service, read_document, read_options
from app.api.openapi import error_responses, upload_schema
from app.api.routes import EventStream, stream_format
from app.api.security import client_id
from app.errors import (
    InvalidIdempotencyKey,
    InvalidLastEventId,
    JobCancelled,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    OCRError,
    PageNotFound,
    PictureNotFound,
)
from app.grounding import picture_png
from app.imaging import page_png
from app.jobs import JobDetail, JobRecord, JobRunner, JobSummary, NewJob, summarize, validate_callback_url
from app.jobs.events import event_id, job_events
from app.results import DocumentResult
from app.streaming import ndjson, server_sent, with_heartbeat
from app.text import markdown_to_text

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


def get_runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.jobs
    return runner


Runner = Annotated[JobRunner, Depends(get_runner)]


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="Newest first, without their pages.")


_SUBMIT_SCHEMA = upload_schema(
    password={
        "type": "string",
        "description": "Password of an encrypted PDF; stored with the job until it expires.",
    },
    callback_url={
        "type": "string",
        "description": "http(s) URL that gets a signed POST of the job summary when it ends.",
    },
)


def _owner_filter(request: Request) -> str | None:
    """With API keys on, a caller sees only its own jobs; without keys, every job."""
    client = client_id(request)
    return client if client.startswith("key:") else None


async def _job(request: Request, runner: JobRunner, job_id: str) -> JobRecord:
    record = await runner.store.get(job_id)
    owner = _owner_filter(request)
    if record is None or (owner is not None and record.owner != owner):
        raise JobNotFound(f"no job {job_id!r} (unknown, expired, or not yours)", job_id=job_id)
    return record


@router.post(
    "",
    status_code=202,
    response_model=JobSummary,
    summary="Queue a document for OCR",
    description="Same inputs and refusals as /api/inference, plus `callback_url`. Answers 202 at once with "
    "`Location: /api/jobs/{id}`; poll that URL, or wait for the webhook.",
    openapi_extra=_SUBMIT_SCHEMA,
    responses=error_responses(400, 401, 408, 413, 415, 422, 429, 503, 507),
)
async def submit(
    request: Request,
    service: Service,
    runner: Runner,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Makes a retried submission safe: the same key and submission from the same client get "
            "the job the first one created (`Idempotent-Replayed: true`), not a second job; the same key for "
            "another submission is refused (422 `idempotency_key_reused`). Up to 255 printable ASCII characters; "
            "remembered as long as the job."
        ),
    ] = None,
) -> JSONResponse:
    upload = await read_document(request, service)
    callback_url = upload.fields.get("callback_url") or None
    if callback_url is not None:
        callback_url = validate_callback_url(callback_url)
    pages = upload.fields.get("pages")
    password = upload.fields.get("password") or None
    client = client_id(request)
    options = read_options(upload)
    stored_options = options.to_dict()
    key = _checked_idempotency_key(idempotency_key)
    new = NewJob(
        owner=client,
        pages=[],
        pages_spec=pages,
        password=password,
        callback_url=callback_url,
        filename=upload.filename,
        options=stored_options,
        idempotency_key=key,
        request_sha256=None if key is None else await anyio.to_thread.run_sync(
            _fingerprint, upload.data, pages, password, stored_options, callback_url
        ),
    )  # fmt: skip
    # A retry is answered before admission: it must not be charged or refused as a second submission.
    record = await runner.store.replay(new)
    if record is None:
        # Admission limits apply here, where the caller can be told; the runner waits instead.
        numbers = await service.check_admission(
            upload.data, pages=pages, password=password, client=client, options=options
        )
        record = await runner.store.create(replace(new, pages=numbers), upload.data)
        runner.notify()
    body = summarize(record, runner.clock()).model_dump(mode="json")
    headers = {"Location": f"/api/jobs/{record.id}"}
    if record.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


_IDEMPOTENCY_KEY_MAX = 255


def _checked_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= _IDEMPOTENCY_KEY_MAX or not all(" " <= char <= "~" for char in value):
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1 to {_IDEMPOTENCY_KEY_MAX} printable ASCII characters",
            length=len(value),
        )
    return value


def _fingerprint(
    data: bytes, pages: str | None, password: str | None, options: dict[str, Any], callback_url: str | None
) -> str:
    """What an Idempotency-Key stands for: the document and every field that shapes the job (megabytes: a thread)."""
    digest = hashlib.sha256(data)
    digest.update(json.dumps([pages, password, options, callback_url], sort_keys=True).encode())
    return digest.hexdigest()


@router.get(
    "",
    response_model=JobList,
    summary="List jobs, newest first",
    description="With API keys on, only the jobs submitted with the caller's key; without keys, every job. "
    "Expired jobs are gone from the list.",
    responses=error_responses(401),
)
async def list_jobs(request: Request, runner: Runner, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    records = await runner.store.list_jobs(_owner_filter(request), limit)
    now = runner.clock()
    return JobList(jobs=[summarize(record, now) for record in records])


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    summary="A job's status, progress, ETA and finished pages",
    description="`eta_s` is the time left at the page rate this job has measured since it (re)started; null "
    "until a page finished. `pages` holds the finished pages so far (as in /api/inference), in page order.",
    responses=error_responses(401, 404),
)
async def get_job(request: Request, runner: Runner, job_id: str) -> Response:
    record = await _job(request, runner, job_id)
    pages = await runner.store.pages(record.id)
    summary = summarize(record, runner.clock())
    detail = JobDetail(**summary.model_dump(), pages=[page.result for page in pages])
    # Encoded off the event loop: a long job's finished pages are megabytes of JSON.
    return Response(await anyio.to_thread.run_sync(detail.model_dump_json), media_type="application/json")


@router.get(
    "/{job_id}/result",
    summary="A finished job's document: JSON, markdown or plain text",
    description="`format=json` (default): the DocumentResult, as /api/inference answers. `md`: its markdown. "
    "`txt`: the markdown rendered and reduced to plain text (tags dropped, list markers kept, table cells "
    "tab-separated, math kept as written). A cancelled job has no result (409 `job_cancelled`): its finished pages "
    "are in GET /api/jobs/{id}.",
    responses={
        **error_responses(401, 404, 409),
        200: {"model": DocumentResult, "content": {"text/markdown": {}, "text/plain": {}}},
    },
)
async def get_result(
    request: Request,
    service: Service,
    runner: Runner,
    job_id: str,
    fmt: Annotated[Literal["json", "md", "txt"], Query(alias="format")] = "json",
) -> Response:
    record = await _job(request, runner, job_id)
    if not record.finished:
        raise JobNotFinished(
            f"job {job_id} is {record.status}: {record.pages_done} of {record.pages_total} pages done",
            status=record.status,
            pages_done=record.pages_done,
            pages_total=record.pages_total,
        )
    if record.status == "failed":
        raise JobFailed(f"job {job_id} failed; see `details.error`", error=record.error)
    if record.status == "cancelled":
        raise JobCancelled(
            f"job {job_id} was cancelled after {record.pages_done} of {record.pages_total} pages; "
            f"GET /api/jobs/{job_id} lists the pages it finished",
            pages_done=record.pages_done,
            pages_total=record.pages_total,
        )
    # Assembled and encoded off the event loop: a long job's result is megabytes of JSON.
    try:
        result = await anyio.to_thread.run_sync(service.assemble, await runner.store.pages(record.id))
    except OCRError as exc:  # settings changed since it finished (say, a lower MAX_FAILED_PAGE_RATIO)
        raise JobFailed(f"job {job_id} has no usable result: {exc.message}", error=exc.to_dict()) from None
    if fmt == "md":
        return PlainTextResponse(result.text, media_type="text/markdown; charset=utf-8")
    if fmt == "txt":
        return PlainTextResponse(await anyio.to_thread.run_sync(markdown_to_text, result.text))
    body = await anyio.to_thread.run_sync(result.model_dump_json)
    return Response(body, media_type="application/json")


@router.get(
    "/{job_id}/events",
    summary="Follow a job: its pages as events, as they finish (NDJSON or SSE; resumable)",
    description="The streaming API's events for a job, from any replica: `start` {total, pages}, then per finished "
    "page, in the order pages were stored, `page` {page} and `progress` {done, total}, and last `result` {result} "
    "(succeeded, partial) or `error` {error} (failed: the job's error; cancelled: `job_cancelled`). "
    "`Accept: text/event-stream` gives SSE, anything else NDJSON. A `ping` (SSE: a `: ping` comment) after 15 s "
    "without another event keeps proxies from closing a quiet stream. Resumable: SSE ids are 0 for `start` and "
    "`done` for each `progress`; send `Last-Event-ID: <done>` (EventSource does) to get only the pages after that "
    "many (no `start` again). The same id works on any replica, and for NDJSON use the last `progress.done` read. "
    "A job that already ended answers its pages and final event at once.",
    responses={
        **error_responses(401, 404, 422),
        200: {
            "description": "A stream of events (see description).",
            "content": {"application/x-ndjson": {}, "text/event-stream": {}},
        },
    },
)
async def follow_job(
    request: Request,
    service: Service,
    runner: Runner,
    job_id: str,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this many stored pages.")
    ] = None,
) -> Response:
    record = await _job(request, runner, job_id)
    after = _resume_point(last_event_id, record)
    media_type, encode = stream_format(request.headers.get("accept", "")) or ("application/x-ndjson", ndjson)
    if media_type == "text/event-stream":
        encode = partial(server_sent, ids=event_id)
    events = with_heartbeat(job_events(runner.store, runner.feed, service.assemble, record, after=after))

    async def nothing_to_release() -> None:
        return None

    return EventStream(events, encode, media_type=media_type, on_close=nothing_to_release)


def _resume_point(header: str | None, record: JobRecord) -> int | None:
    """`Last-Event-ID` as the number of stored pages the client has (None: from the start)."""
    if header is None or not header.strip():
        return None
    value = header.strip()
    if not value.isdigit() or int(value) > record.pages_total:
        raise InvalidLastEventId(
            f"Last-Event-ID must be a whole number from 0 to {record.pages_total} (the pages already received)",
            received=value[:40],
        )
    return int(value)


@router.get(
    "/{job_id}/pages/{page}/image",
    summary="The PNG the model saw for page `page` (1-based)",
    description="Rendered again from the stored document by the same intake code, so it is the exact image "
    "that was (or will be) sent to the model.",
    responses={**error_responses(401, 404), 200: {"content": {"image/png": {}}}},
)
async def get_page_image(request: Request, service: Service, runner: Runner, job_id: str, page: int) -> Response:
    record = await _job(request, runner, job_id)
    if page not in record.pages:
        raise PageNotFound(f"page {page} is not one of job {job_id}'s pages", page=page, pages=record.pages)
    data = await runner.store.document(record.id)
    if data is None:
        raise JobNotFound(f"no job {job_id!r} (unknown, expired, or not yours)", job_id=job_id)
    async with service.opened(data, pages=str(page), password=record.password) as (document, _):
        png, _ = await anyio.to_thread.run_sync(page_png, document, page - 1)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/{job_id}/pages/{page}/images/{picture}",
    summary="Picture `picture` of page `page`, cropped from the page image (PNG)",
    description="A finished page's picture with a box (a grounding `image` block, or a `-bbox` checkpoint's "
    "picture): `picture` is the block's `picture` number, as in its markdown reference `page_N_image_K.png`. "
    "Cropped from the page image the model saw (as GET /api/jobs/{id}/pages/{n}/image), with a 5 px margin.",
    responses={**error_responses(401, 404), 200: {"content": {"image/png": {}}}},
)
async def get_picture(
    request: Request, service: Service, runner: Runner, job_id: str, page: int, picture: int
) -> Response:
    record = await _job(request, runner, job_id)
    if page not in record.pages:
        raise PageNotFound(f"page {page} is not one of job {job_id}'s pages", page=page, pages=record.pages)
    finished = {done.page: done for done in await runner.store.pages(record.id)}
    blocks = finished[page].blocks if page in finished else []
    boxed = {block.picture: block.bbox for block in blocks if block.picture is not None and block.bbox is not None}
    bbox = boxed.get(picture)
    if bbox is None:
        state = "" if page in finished else " (the page is not finished yet)"
        raise PictureNotFound(
            f"page {page} of job {job_id} has no picture {picture} with a box{state}", pictures=sorted(boxed)
        )
    data = await runner.store.document(record.id)
    if data is None:
        raise JobNotFound(f"no job {job_id!r} (unknown, expired, or not yours)", job_id=job_id)
    async with service.opened(data, pages=str(page), password=record.password) as (document, _):
        image = await anyio.to_thread.run_sync(document.render, page - 1)
    png = await anyio.to_thread.run_sync(picture_png, image, bbox)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.delete(
    "/{job_id}",
    response_model=JobSummary,
    summary="Cancel a job, or delete it for good",
    description="Pages not started never reach the engine; finished pages are kept and the job ends `cancelled`. "
    "A job that already ended is returned unchanged. With `purge=true` the job (cancelled first if it had not "
    "ended) is then deleted at once with its document, password and pages, instead of JOBS_TTL_HOURS after it "
    "ended: the answer is its last summary, and the id is 404 from then on.",
    responses=error_responses(401, 404),
)
async def cancel_job(
    request: Request,
    runner: Runner,
    job_id: str,
    purge: Annotated[bool, Query(description="Also delete the job, its document and password now.")] = False,
) -> JobSummary:
    await _job(request, runner, job_id)
    record = await runner.cancel(job_id)
    if record is None or (purge and not await runner.store.delete(job_id)):
        raise JobNotFound(f"no job {job_id!r} (unknown, expired, or not yours)", job_id=job_id)
    if purge:
        log.info("job %s deleted on request (purge)", job_id)
    return summarize(record, runner.clock())

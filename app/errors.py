"""The service's one exception tree.

Every failure a caller can see is an `OCRError`: it carries the HTTP status it
maps to and a stable machine-readable `code`, so the web layer needs a single
handler and clients can branch on `code` without parsing messages. Each class's
docstring says first when it is raised: the API description's error table is built
from those sentences (app/api/openapi.py), and a test checks the README's table
lists every code.

    OCRError (500 internal_error)
    ├── BadRequest (400 bad_request)
    │   ├── MalformedRequest (400 malformed_request)
    │   ├── MultipleFiles (400 multiple_files)
    │   ├── MissingFile (422 missing_file)
    │   ├── UnknownField (422 unknown_field)
    │   ├── InvalidCallbackUrl (422 invalid_callback_url)
    │   ├── InvalidIdempotencyKey (422 invalid_idempotency_key)
    │   └── IdempotencyKeyReused (422 idempotency_key_reused)
    ├── UploadTimeout (408 upload_timeout)
    ├── ClientDisconnected (499 client_closed_request, never seen: the client left)
    ├── PayloadTooLarge (413 file_too_large)
    │   └── FieldTooLarge (413 field_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── DocumentError (422 invalid_document)
    │   ├── EmptyDocument (422 empty_document)
    │   ├── CorruptDocument (422 corrupt_document)
    │   ├── PasswordRequired (422 password_required)
    │   ├── WrongPassword (422 wrong_password)
    │   ├── TooManyPages (422 too_many_pages)
    │   ├── ImageTooLarge (422 image_too_large)
    │   ├── RenderTimeout (422 render_timeout)
    │   └── InvalidPages (422 invalid_pages)
    ├── Unauthorized (401 unauthorized, WWW-Authenticate)
    ├── EngineError (502 engine_error)
    │   ├── PageRejected (502 page_rejected)
    │   ├── DocumentFailed (502 document_failed)
    │   └── EngineTimeout (504 engine_timeout)
    ├── IntakeWorkerCrashed (500 intake_worker_crashed)
    ├── RequestTimeout (504 request_timeout)
    ├── JobNotFound (404 job_not_found: unknown, another key's, or expired)
    ├── PageNotFound (404 page_not_found)
    ├── JobConflict (409 job_conflict)
    │   ├── JobNotFinished (409 job_not_finished)
    │   ├── JobFailed (409 job_failed)
    │   └── JobCancelled (409 job_cancelled)
    ├── JobsStorageFull (507 jobs_storage_full)
    └── Retryable (carries Retry-After)
        ├── TooManyRequests (429 too_many_requests)
        │   ├── RateLimited (429 rate_limited)
        │   └── TooManyPagesInFlight (429 too_many_pages_in_flight)
        └── ServiceUnavailable (503 service_unavailable)
            ├── Overloaded (503 overloaded)
            ├── EngineNotReady (503 engine_not_ready)
            ├── EngineUnavailable (503 engine_unavailable)
            └── ShuttingDown (503 shutting_down)
"""

from __future__ import annotations

from typing import Any, ClassVar


class OCRError(Exception):
    """An unexpected failure; the incident was logged."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(OCRError):
    """The request cannot be understood."""

    status = 400
    code = "bad_request"


class MalformedRequest(BadRequest):
    """Not `multipart/form-data`, or a broken multipart body."""

    code = "malformed_request"


class MultipleFiles(BadRequest):
    """More than one `file` part."""

    code = "multiple_files"


class MissingFile(BadRequest):
    """No `file` field (details: `received_as` when a file came under another field name)."""

    status = 422
    code = "missing_file"


class UnknownField(BadRequest):
    """A form field or query parameter the route does not take (details: `fields`, `accepted`).

    E.g. `page` for `pages`: refused, not ignored.
    """

    status = 422
    code = "unknown_field"


class InvalidOption(BadRequest):
    """A form field has a value the route does not take, e.g. `mode=layout` (details: `field`, `accepted`)."""

    status = 422
    code = "invalid_option"


class ModeNotSupported(BadRequest):
    """`mode=grounding` asked of a model without grounding: only generation-3 models have it.

    details: `model`, `profile`.
    """

    status = 422
    code = "mode_not_supported"


class InvalidCallbackUrl(BadRequest):
    """The callback URL is not acceptable."""

    status = 422
    code = "invalid_callback_url"


class InvalidLastEventId(BadRequest):
    """`Last-Event-ID` of `GET /api/jobs/{id}/events` is not a whole number of pages from 0 (details: `received`)."""

    status = 422
    code = "invalid_last_event_id"


class InvalidIdempotencyKey(BadRequest):
    """The `Idempotency-Key` header of `POST /api/jobs` is empty, over 255 characters, or not printable ASCII."""

    status = 422
    code = "invalid_idempotency_key"


class IdempotencyKeyReused(BadRequest):
    """This client already used the `Idempotency-Key` for a different submission (details: `job_id`).

    Keys are remembered as long as their job (JOBS_TTL_HOURS): a retry of the same submission gets the job the first
    one created; another document, page selection, password, options or callback under the same key is refused.
    """

    status = 422
    code = "idempotency_key_reused"


class UploadTimeout(OCRError):
    """No byte of the upload for `UPLOAD_IDLE_TIMEOUT_S`, or it took longer than `UPLOAD_TIMEOUT_S`."""

    status = 408
    code = "upload_timeout"


class ClientDisconnected(OCRError):
    """The client closed the connection before its answer; nobody receives it (its pages are dropped)."""

    status = 499
    code = "client_closed_request"


class PayloadTooLarge(OCRError):
    """The file is over `MAX_FILE_SIZE_MB` (detected while reading)."""

    status = 413
    code = "file_too_large"


class FieldTooLarge(PayloadTooLarge):
    """A form field is over `MAX_FIELD_SIZE_KB`."""

    code = "field_too_large"


class UnsupportedMediaType(OCRError):
    """The bytes are not a supported document type."""

    status = 415
    code = "unsupported_media_type"


class DocumentError(OCRError):
    """The document cannot be read."""

    status = 422
    code = "invalid_document"


class EmptyDocument(DocumentError):
    """Empty file, or a PDF with no pages."""

    code = "empty_document"


class CorruptDocument(DocumentError):
    """The PDF or image cannot be read."""

    code = "corrupt_document"


class PasswordRequired(DocumentError):
    """Encrypted PDF without `password`."""

    code = "password_required"


class WrongPassword(DocumentError):
    """Encrypted PDF with a wrong `password`."""

    code = "wrong_password"


class TooManyPages(DocumentError):
    """More pages selected than `MAX_PAGES`."""

    code = "too_many_pages"


class ImageTooLarge(DocumentError):
    """More pixels than `MAX_IMAGE_PIXELS`."""

    code = "image_too_large"


class RenderTimeout(DocumentError):
    """A page (or opening the document) took longer than `INTAKE_TIMEOUT_S` in its intake worker process.

    The worker was killed and replaced; only that page fails. A page that no renderer finishes in time is content
    built to be slow (a PDF drawing millions of paths, say). With `INTAKE_WORKERS=0` (threads) there is no such bound.
    """

    code = "render_timeout"


class InvalidPages(DocumentError):
    """Bad `pages` value, or a page past the end."""

    code = "invalid_pages"


class EngineError(OCRError):
    """The engine failed on the only page (repeated 5xx, bad answer).

    The engine answered, but not with a usable result.
    """

    status = 502
    code = "engine_error"


class PageRejected(EngineError):
    """The model cannot process this page (vLLM 400, or 500 for this input); not retried.

    vLLM's 400, or its 500 for a processing error on this input; a page that fails alone in the
    `huggingface` engine. Not retried: the answer would not change.
    """

    code = "page_rejected"


class EngineTimeout(EngineError):
    """A page took longer than `VLLM_PAGE_TIMEOUT_S`."""

    status = 504
    code = "engine_timeout"


class DocumentFailed(EngineError):
    """More than `MAX_FAILED_PAGE_RATIO` of the pages failed.

    Too many pages failed for the document to count as read (MAX_FAILED_PAGE_RATIO).
    """

    code = "document_failed"


class IntakeWorkerCrashed(OCRError):
    """The intake worker process rendering the page (or opening the document) died while it held it.

    PDFium crashed on this document, or the process was killed (`INTAKE_WORKERS`). Only the pages that worker held
    fail; it is replaced and other pages and requests go on. Sending the same document again may crash again.
    """

    status = 500
    code = "intake_worker_crashed"


class RequestTimeout(OCRError):
    """The pages did not finish within `REQUEST_TIMEOUT_S` (details: pages done/total)."""

    status = 504
    code = "request_timeout"


class JobNotFound(OCRError):
    """Unknown job, another key's job, or an expired one."""

    status = 404
    code = "job_not_found"


class PageNotFound(OCRError):
    """The page is not one of the job's pages (`GET /api/jobs/{id}/pages/{n}/image`).

    `details.pages` lists the job's pages.
    """

    status = 404
    code = "page_not_found"


class PictureNotFound(OCRError):
    """The page has no picture with that number and a box (`GET /api/jobs/{id}/pages/{n}/images/{k}`).

    `details.pictures` lists the page's pictures that have one.
    """

    status = 404
    code = "picture_not_found"


class JobConflict(OCRError):
    """The job is not in a state that allows the request.

    The job exists but is not in a state that allows the request.
    """

    status = 409
    code = "job_conflict"


class JobNotFinished(JobConflict):
    """The job has no result yet."""

    code = "job_not_finished"


class JobFailed(JobConflict):
    """The job failed; its error says why.

    GET /api/jobs/{id}/result of a job that ended `failed`; `details.error` is the job's error.
    """

    code = "job_failed"


class JobCancelled(JobConflict):
    """The job was cancelled: it has no result (its finished pages are in `GET /api/jobs/{id}`).

    GET /api/jobs/{id}/result of a cancelled job: it has no result (its finished pages are in the job).
    """

    code = "job_cancelled"


class JobsStorageFull(OCRError):
    """Job storage is full until older jobs expire.

    JOBS_MAX_BYTES reached: nothing more is stored until older jobs expire.
    """

    status = 507
    code = "jobs_storage_full"


class Unauthorized(OCRError):
    """API keys are on and the key is missing or wrong (with `WWW-Authenticate`)."""

    status = 401
    code = "unauthorized"


class Retryable(OCRError):
    """Temporary: the caller should retry after `retry_after` seconds (sent as Retry-After). Never raised itself."""

    def __init__(self, message: str, *, retry_after: int = 5, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class TooManyRequests(Retryable):
    """The client is over a per-client limit (with `Retry-After`)."""

    status = 429
    code = "too_many_requests"


class RateLimited(TooManyRequests):
    """The client is over `RATE_LIMIT_PAGES_PER_MIN` (with `Retry-After`)."""

    code = "rate_limited"


class TooManyPagesInFlight(TooManyRequests):
    """The client is over `KEY_MAX_PAGES_IN_FLIGHT` (with `Retry-After`)."""

    code = "too_many_pages_in_flight"


class ServiceUnavailable(Retryable):
    """The service cannot take work now (with `Retry-After`)."""

    status = 503
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    """More than `MAX_QUEUED_PAGES` pages waiting (with `Retry-After`)."""

    code = "overloaded"


class EngineNotReady(ServiceUnavailable):
    """The model is still loading (with `Retry-After`)."""

    code = "engine_not_ready"


class EngineUnavailable(ServiceUnavailable):
    """The model failed to load, vLLM is unreachable or serves another model (with `Retry-After`)."""

    code = "engine_unavailable"


class ShuttingDown(ServiceUnavailable):
    """The server stopped before the request finished (SIGTERM past `SHUTDOWN_GRACE_S`; with `Retry-After`); a stream
    ends with this `error` event.

    The server stopped before this request finished (SIGTERM, and SHUTDOWN_GRACE_S ran out): retry it.
    """

    code = "shutting_down"


class StoreUnavailable(ServiceUnavailable):
    """The job store (JOBS_DB: the PostgreSQL server) cannot be reached now (with `Retry-After`); nothing accepted is
    lost: retry the request.
    """

    code = "store_unavailable"


def error_classes() -> dict[str, type[OCRError]]:
    """Every error class by its code (the most general class where several share a code)."""
    found: dict[str, type[OCRError]] = {}
    pending: list[type[OCRError]] = [OCRError]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        found.setdefault(cls.code, cls)
    return found


def rebuild_error(code: str, message: str, details: dict[str, Any] | None = None, *, retry_after: int = 5) -> OCRError:
    """The error a stored `{code, message, details}` describes, with its HTTP status (an unknown code: 500).

    Wire and stored types carry no exceptions; this turns a page's recorded error back into the one to raise.
    """
    cls = error_classes().get(code, OCRError)
    error = cls.__new__(cls)
    OCRError.__init__(error, message, **(details or {}))
    if isinstance(error, Retryable):
        error.retry_after = retry_after
    return error

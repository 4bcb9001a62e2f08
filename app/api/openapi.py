"""OpenAPI plumbing for errors: the error model, each route's error responses, the API description's table.

The "when" of each code is the first sentence of its class's docstring in `app/errors.py` (one source);
only the framework's own codes (404, 405, 422 validation) are described here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, Field

from app.errors import ClientDisconnected, error_classes


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable machine-readable code (see the table in the API description).", examples=["too_many_pages"]
    )
    message: str = Field(description="What went wrong, for people; wording may change, branch on `code`.")
    details: dict[str, object] | None = Field(
        default=None,
        description="Machine-readable facts about this error, when it has any (e.g. `max_pages`).",
        examples=[{"pages_selected": 120, "max_pages": 100}],
    )


class ErrorResponse(BaseModel):
    """Every error, whatever the route, has this one shape."""

    error: ErrorBody = Field(description="The error.")


# Raised by the framework, not by an `OCRError`: (status, code, when).
_HTTP_ERRORS = (
    (404, "not_found", "unknown route"),
    (405, "method_not_allowed", "known route, other method"),
    (422, "validation_error", "other request validation failures"),
)
# The code shown as each status's example in /docs.
_EXAMPLE = {400: "malformed_request", 422: "too_many_pages", 429: "rate_limited", 503: "engine_not_ready"}


def error_codes() -> list[tuple[int, str]]:
    """(status, code) of every error a client can receive, by status then code."""
    codes = {
        (cls.status, code) for code, cls in error_classes().items() if cls.status != ClientDisconnected.status
    }  # a client that left receives nothing
    return sorted(codes | {(status, code) for status, code, _ in _HTTP_ERRORS})


def describe_code(code: str) -> str:
    """When `code` is answered: the first sentence of its error class's docstring."""
    for _, http_code, when in _HTTP_ERRORS:
        if http_code == code:
            return when
    cls = error_classes().get(code)
    doc = (cls.__doc__ or "").strip() if cls is not None else ""
    first = " ".join(doc.split("\n\n")[0].split()).removesuffix(".")
    if not first:
        return code.replace("_", " ")
    word = first.split()[0]
    return first if len(word) > 1 and word.isupper() else first[0].lower() + first[1:]  # "API keys" stays


def error_table() -> str:
    """The error codes as a markdown table, for the API description."""
    rows = [f"| {status} | `{code}` | {describe_code(code)} |" for status, code in error_codes()]
    return "\n".join(["| status | code | when |", "|---|---|---|", *rows])


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses: the error model, the codes each can carry, an example."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = [code for code_status, code in error_codes() if code_status == status]
        example = _EXAMPLE.get(status) or (codes[0] if codes else "internal_error")
        responses[status] = {
            "model": ErrorResponse,
            "description": "Codes: " + ", ".join(f"`{code}`" for code in codes) + ".",
            "content": {
                "application/json": {"example": {"error": {"code": example, "message": describe_code(example)}}}
            },
        }
    return responses


def upload_schema(**fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI body of the document upload (`file`, `pages`, `password`), plus route-specific fields."""
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "PDF, PNG, JPEG, TIFF, WebP, BMP or GIF (type read from the bytes).",
        },
        "pages": {
            "type": "string",
            "description": "1-based pages to read, e.g. `1-3,7` or `5-`. Default: all.",
            "examples": ["1-3,7"],
        },
        "password": {"type": "string", "description": "Password of an encrypted PDF."},
        "mode": {
            "type": "string",
            "enum": ["plain", "grounding"],
            "default": "plain",
            "description": "`plain`: markdown. `grounding` (generation-3 models; others answer 422 "
            "`mode_not_supported`): every block also gets the model's layout `label` and its box (`bbox` in pixels of "
            "the page image, `bbox_norm` 0-1000).",
        },
        "drop_headers_footers": {
            "type": "boolean",
            "default": False,
            "description": "Grounding mode: leave `header`, `footer`, `page_number` and `footnote` blocks out of the "
            "markdown `text` (they stay in `blocks`).",
        },
        "images": {
            "type": "string",
            "enum": ["none", "inline"],
            "default": "none",
            "description": "`inline`: each picture with a box (a grounding `image` block, a `-bbox` checkpoint's "
            "picture) carries its crop from the page image as a PNG data URL in `blocks[].image`.",
        },
        **fields,
    }
    # Other fields are refused (422 unknown_field): `read_upload` accepts exactly these properties.
    schema = {"type": "object", "required": ["file"], "properties": properties, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def edit_openapi(app: FastAPI, edit: Callable[[dict[str, Any]], None]) -> None:
    """Run `edit` on the generated schema once, before FastAPI caches it; edits apply in the order added."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        edit(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_validation_errors(app: FastAPI) -> None:
    """Make /docs tell the truth about 422: FastAPI documents its own shape, the handler above sends ours."""
    edit_openapi(app, _our_validation_errors)


def _our_validation_errors(schema: dict[str, Any]) -> None:
    ours = jsonable_encoder(error_responses(422)[422]["content"]["application/json"]["example"])
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is not None and "HTTPValidationError" in str(response):
                response["description"] = error_responses(422)[422]["description"]
                response["content"] = {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                        "example": ours,
                    }
                }
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)  # every route references ErrorResponse instead
    components.pop("ValidationError", None)

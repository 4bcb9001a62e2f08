"""What differs between the OpenAI-compatible servers the remote engine talks to, in one place.

The remote engine (`app/engines/vllm.py`) speaks one protocol; the servers behind it answer it with small
differences, all read here so the engine sees one shape:

- `/v1/models`: vLLM lists `max_model_len` per model; llama.cpp's `llama-server` lists the model file's name
  (or its `--alias`), `"owned_by": "llamacpp"`, its aliases, and the per-request context as `meta.n_ctx`;
  mlx-vlm and others list ids only (no context: nothing is checked).
- error bodies: OpenAI, vLLM and llama-server send `{"error": {"message", "type", "code"}}`; older vLLM sent
  `{"object": "error", "message": ...}`; FastAPI-based servers (mlx-vlm) send `{"detail": ...}`; vLLM's 401 is
  `{"error": "Unauthorized"}`.
- sampling defaults: llama-server samples with `top_k=40` and `min_p=0.05` unless told otherwise; the authors
  sample with neither (REFERENCE.md: top_k 0), so requests to it say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ServerKind(StrEnum):
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    OTHER = "other"  # any other OpenAI-compatible server (mlx-vlm, LM Studio, a proxy): protocol only


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model a server lists on /v1/models, as the engine needs it."""

    id: str
    names: frozenset[str]  # the id and its aliases: what MODEL_NAME may be
    context: int | None  # tokens a request may hold (prompt + answer) when the server says; None otherwise
    kind: ServerKind


class NotOpenAIShaped(ValueError):
    """The /v1/models answer is not `{"data": [{"id": ...}, ...]}`."""


def served_models(body: Any) -> list[ServedModel]:
    """The models of a /v1/models answer; raises NotOpenAIShaped when it is not one."""
    try:
        cards = body["data"]
        if not isinstance(cards, list):
            raise TypeError
        return [_served_model(card) for card in cards]
    except (KeyError, TypeError, IndexError):
        raise NotOpenAIShaped("not an OpenAI model list") from None


def _served_model(card: dict[str, Any]) -> ServedModel:
    model_id = str(card["id"])
    owner = card.get("owned_by")
    kind = ServerKind.VLLM if owner == "vllm" else ServerKind.LLAMA_CPP if owner == "llamacpp" else ServerKind.OTHER
    names = {model_id}
    aliases = card.get("aliases")
    if isinstance(aliases, list):
        names.update(str(alias) for alias in aliases if alias)
    context = card.get("max_model_len")
    meta = card.get("meta")
    if context is None and isinstance(meta, dict):
        context = meta.get("n_ctx")  # llama-server: the context of one slot, i.e. of one request
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        context = None
    return ServedModel(id=model_id, names=frozenset(names), context=context, kind=kind)


def request_extras(kind: ServerKind) -> dict[str, Any]:
    """Fields to add to every chat request for this kind of server, so it samples as the authors do."""
    if kind is ServerKind.LLAMA_CPP:
        return {"top_k": 0, "min_p": 0.0}  # 0 switches each off in llama.cpp (its defaults are 40 and 0.05)
    return {}


def error_message(body: Any) -> str | None:
    """The server's error message, from any of the error-body shapes above; None when there is none."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message")
    elif isinstance(error, str):
        message = error
    elif body.get("object") == "error":
        message = body.get("message")
    else:
        message = body.get("detail")
    return message if isinstance(message, str) else None

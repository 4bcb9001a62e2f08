"""What differs between LightOnOCR checkpoints, looked up by the model's name.

One table (REFERENCE.md, "The other checkpoints a user will point the service at"; LightOn's own
`lightonocr/models.py`): generation, architecture, page size, sampling, grounding, picture boxes and
the extra fields every request carries. A name is matched case-insensitively on its last path
component (`lightonai/LightOnOCR-3-4B`, a vLLM `--served-model-name`, a local directory
`/models/LightOnOCR-2-1B`); a name that only starts with a known checkpoint's
(`LightOnOCR-2-1B-finetuned`) gets that checkpoint's row, as LightOn's client does. Anything else gets
LightOn's fallback, generation 3 at 2048 px, with one warning per name.

Nothing here imports FastAPI or torch: the service, the engines and the tests read the same rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Mapping

    from app.settings import Settings

log = logging.getLogger(__name__)

Architecture = Literal["lightonocr", "qwen3_5"]

# The text part that asks a generation-3 model for grounded blocks (LightOn's GROUNDING_PROMPT).
GROUNDING_PROMPT = "grounding"
# The Qwen3.5-based checkpoints were trained without thinking: every request turns it off.
NO_THINKING: Mapping[str, Any] = MappingProxyType(
    {"chat_template_kwargs": MappingProxyType({"enable_thinking": False})}
)
_VLLM_BASE_FLAGS = "--limit-mm-per-prompt '{\"image\": 1}' --mm-processor-cache-gb 0 --no-enable-prefix-caching"


@dataclass(frozen=True, slots=True)
class Profile:
    """One row of the table: how to run a checkpoint the way its authors do."""

    name: str  # the checkpoint's name as published (`LightOnOCR-3-4B`), or `fallback`
    generation: int
    architecture: Architecture  # which transformers classes load it
    longest_edge: int  # pages are rendered and sent at most this long (px)
    temperature: float
    top_p: float
    supports_grounding: bool  # mode=grounding (generation 3)
    emits_picture_boxes: bool  # `![image](image_N.png) x1,y1,x2,y2` after every picture (the -bbox ones)
    # Fields added to every chat request as they are (vLLM's `chat_template_kwargs`), and passed to the
    # chat template by the huggingface engine.
    extra_body: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Smallest page side the vision encoder takes (patch x spatial merge): shorter sides are padded.
    min_side: int = 28
    max_model_len: int = 16384  # the authors' --max-model-len
    known: bool = True  # False: the fallback for a name the table does not have

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """What the chat template is given besides the messages (the huggingface engine's side of extra_body)."""
        return dict(self.extra_body.get("chat_template_kwargs", {}))

    def request_extra(self) -> dict[str, Any]:
        """`extra_body` as plain JSON-ready dicts (a fresh copy per request)."""
        return json.loads(json.dumps(self.extra_body, default=dict))  # type: ignore[no-any-return]

    def vllm_command(self, hub_id: str | None = None) -> str:
        """The authors' `vllm serve` command for this checkpoint (README's table)."""
        model = hub_id or f"lightonai/{self.name}"
        flags = f"{_VLLM_BASE_FLAGS} --max-model-len {self.max_model_len}"
        if self.extra_body.get("chat_template_kwargs"):
            flags += " --default-chat-template-kwargs '{\"enable_thinking\": false}'"
        return f"vllm serve {model} {flags}"

    def describe(self) -> dict[str, Any]:
        """The row as /info shows it."""
        return {
            "name": self.name,
            "known": self.known,
            "generation": self.generation,
            "architecture": self.architecture,
            "longest_edge": self.longest_edge,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "supports_grounding": self.supports_grounding,
            "emits_picture_boxes": self.emits_picture_boxes,
            "extra_request_fields": self.request_extra(),
        }


def _pixtral(name: str, generation: int, *, top_p: float, grounding: bool = False, boxes: bool = False) -> Profile:
    return Profile(
        name=name,
        generation=generation,
        architecture="lightonocr",
        longest_edge=1540,
        temperature=0.2,
        top_p=top_p,
        supports_grounding=grounding,
        emits_picture_boxes=boxes,
    )


def _qwen3_5(name: str) -> Profile:
    return Profile(
        name=name,
        generation=3,
        architecture="qwen3_5",
        longest_edge=2048,
        temperature=0.2,
        top_p=1.0,
        supports_grounding=True,
        emits_picture_boxes=False,
        extra_body=NO_THINKING,
        min_side=32,  # Qwen3.5-VL: patch 16 x merge 2
        max_model_len=18000,
    )


_ROWS: tuple[Profile, ...] = (
    _pixtral("LightOnOCR-1B-1025", 1, top_p=0.9),
    _pixtral("LightOnOCR-0.9B-32k-1025", 1, top_p=0.9),
    _pixtral("LightOnOCR-0.9B-16k-1025", 1, top_p=0.9),
    _pixtral("LightOnOCR-2-1B", 2, top_p=0.9),
    _pixtral("LightOnOCR-2-1B-base", 2, top_p=0.9),
    _pixtral("LightOnOCR-2-1B-ocr-soup", 2, top_p=0.9),
    _pixtral("LightOnOCR-2-1B-bbox", 2, top_p=0.9, boxes=True),
    _pixtral("LightOnOCR-2-1B-bbox-base", 2, top_p=0.9, boxes=True),
    _pixtral("LightOnOCR-2-1B-bbox-soup", 2, top_p=0.9, boxes=True),
    _pixtral("LightOnOCR-3-1B", 3, top_p=1.0, grounding=True),
    _qwen3_5("LightOnOCR-3-0.8B"),
    _qwen3_5("LightOnOCR-3-4B"),
)
PROFILES: Mapping[str, Profile] = MappingProxyType({row.name.lower(): row for row in _ROWS})

# LightOn's client: a name it cannot place is a generation-3 model at 2048 px.
FALLBACK = replace(_qwen3_5("fallback"), known=False)

_warned: set[str] = set()


def _key(name: str) -> str:
    return Path(name.strip().rstrip("/\\")).name.lower()


def find_profile(name: str) -> Profile | None:
    """The table's row for `name` (exact last path component, else the longest known prefix), or None."""
    key = _key(name)
    if key in PROFILES:
        return PROFILES[key]
    # A derivative's name extends the checkpoint's: `-finetuned`, `_Q8_0`, `.gguf` (llama.cpp files and aliases).
    prefixed = [row for known, row in PROFILES.items() if key.startswith((known + "-", known + "_", known + "."))]
    return max(prefixed, key=lambda row: len(row.name), default=None)


def lookup(name: str, *aliases: str) -> Profile:
    """The row for `name` (or the first alias the table knows); LightOn's fallback with one warning."""
    for candidate in (name, *aliases):
        row = find_profile(candidate) if candidate else None
        if row is not None:
            return row
    if name not in _warned:
        _warned.add(name)
        log.warning(
            "model %r is not in the profile table: using LightOn's fallback (generation 3, %d px, top_p %g); "
            "set MODEL_PROFILE to one of %s if it is one of these",
            name,
            FALLBACK.longest_edge,
            FALLBACK.top_p,
            ", ".join(row.name for row in _ROWS),
        )
    return FALLBACK


def config_names(model_name: str) -> list[str]:
    """Names recorded in a local checkpoint's config.json (`_name_or_path`, `name_or_path`), if it is one."""
    path = Path(model_name).expanduser()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(config, dict):
        return []
    return [str(config[k]) for k in ("_name_or_path", "name_or_path") if isinstance(config.get(k), str) and config[k]]


@dataclass(frozen=True, slots=True)
class ActiveProfile:
    """The profile in use: the table's row, with the settings that override it applied."""

    row: Profile
    temperature: float
    top_p: float
    longest_edge: int
    overridden: tuple[str, ...]  # the settings that replaced the row's values (RENDER_LONGEST_EDGE, ...)

    @property
    def supports_grounding(self) -> bool:
        return self.row.supports_grounding

    @property
    def emits_picture_boxes(self) -> bool:
        return self.row.emits_picture_boxes

    def describe(self) -> dict[str, Any]:
        """For /info: the row, the values in use and what overrides them."""
        shown = self.row.describe()
        shown.update(
            temperature=self.temperature,
            top_p=self.top_p,
            longest_edge=self.longest_edge,
            overridden_by=list(self.overridden),
        )
        return shown


def active_profile(settings: Settings, model: str | None = None) -> ActiveProfile:
    """MODEL_PROFILE if set, else the model's name (or a local checkpoint's config) looked up; settings override.

    `model`: the name the engine really serves, when it differs from MODEL_NAME (an engine that asks
    the server which model it serves); MODEL_NAME otherwise.
    """
    name = model or settings.model_name
    by_setting = settings.model_profile
    row = lookup(by_setting) if by_setting is not None else lookup(name, *config_names(name))
    overridden = []
    if settings.temperature is not None:
        overridden.append("TEMPERATURE")
    if settings.top_p is not None:
        overridden.append("TOP_P")
    if settings.render_longest_edge is not None:
        overridden.append("RENDER_LONGEST_EDGE")
    return ActiveProfile(
        row=row,
        temperature=row.temperature if settings.temperature is None else settings.temperature,
        top_p=row.top_p if settings.top_p is None else settings.top_p,
        longest_edge=row.longest_edge if settings.render_longest_edge is None else settings.render_longest_edge,
        overridden=tuple(overridden),
    )


def all_profiles() -> tuple[Profile, ...]:
    """Every row, in the table's order (README, tests)."""
    return _ROWS

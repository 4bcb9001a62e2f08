"""The profile table: every checkpoint's row, found by any of its names; the fallback; overrides."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from app.profiles import FALLBACK, PROFILES, active_profile, all_profiles, find_profile, lookup
from app.settings import SettingsError, load_settings

# REFERENCE.md's table, written out again here so a wrong row in app/profiles.py fails:
# name -> (generation, architecture, longest edge, top_p, grounding, picture boxes, no-thinking field).
EXPECTED = {
    "LightOnOCR-1B-1025": (1, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-0.9B-32k-1025": (1, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-0.9B-16k-1025": (1, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-2-1B": (2, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-2-1B-base": (2, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-2-1B-ocr-soup": (2, "lightonocr", 1540, 0.9, False, False, False),
    "LightOnOCR-2-1B-bbox": (2, "lightonocr", 1540, 0.9, False, True, False),
    "LightOnOCR-2-1B-bbox-base": (2, "lightonocr", 1540, 0.9, False, True, False),
    "LightOnOCR-2-1B-bbox-soup": (2, "lightonocr", 1540, 0.9, False, True, False),
    "LightOnOCR-3-1B": (3, "lightonocr", 1540, 1.0, True, False, False),
    "LightOnOCR-3-0.8B": (3, "qwen3_5", 2048, 1.0, True, False, True),
    "LightOnOCR-3-4B": (3, "qwen3_5", 2048, 1.0, True, False, True),
}


def test_the_table_is_reference_md() -> None:
    assert [row.name for row in all_profiles()] == list(EXPECTED)
    for name, (generation, architecture, edge, top_p, grounding, boxes, no_thinking) in EXPECTED.items():
        row = PROFILES[name.lower()]
        assert (row.generation, row.architecture, row.longest_edge, row.top_p) == (
            generation,
            architecture,
            edge,
            top_p,
        )
        assert (row.supports_grounding, row.emits_picture_boxes, row.temperature) == (grounding, boxes, 0.2), name
        extra = {"chat_template_kwargs": {"enable_thinking": False}} if no_thinking else {}
        assert row.request_extra() == extra, name


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("lightonai/LightOnOCR-2-1B", "LightOnOCR-2-1B"),  # hub id
        ("LIGHTONOCR-3-4B", "LightOnOCR-3-4B"),  # served name, any case
        ("/models/LightOnOCR-3-0.8B/", "LightOnOCR-3-0.8B"),  # local directory, trailing slash
        ("lightonai/LightOnOCR-2-1B-bbox", "LightOnOCR-2-1B-bbox"),  # not taken for its prefix 2-1B
        ("me/LightOnOCR-2-1B-bbox-finetuned", "LightOnOCR-2-1B-bbox"),  # a derivative: the longest known prefix
        ("LightOnOCR-3-1B-2610", "LightOnOCR-3-1B"),
        ("LightOnOCR-2-1B.Q8_0.gguf", "LightOnOCR-2-1B"),  # a llama.cpp file name
        ("lightonocr-3-4b_bf16", "LightOnOCR-3-4B"),
    ],
)
def test_names_find_their_row(name: str, row: str) -> None:
    found = find_profile(name)
    assert found is not None
    assert found.name == row


def test_an_unknown_name_gets_lightons_fallback_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    name = f"my-ocr-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.WARNING, logger="app.profiles"):
        first, second = lookup(name), lookup(name)
    assert first is second is FALLBACK
    assert (FALLBACK.generation, FALLBACK.longest_edge, FALLBACK.known) == (3, 2048, False)
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1
    assert "MODEL_PROFILE" in warnings[0]
    # A name that merely contains a known one is not that checkpoint.
    assert find_profile("not-LightOnOCR-2-1B") is None


def test_a_local_checkpoint_is_found_by_the_name_in_its_config(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"_name_or_path": "lightonai/LightOnOCR-3-4B"}))
    profile = active_profile(load_settings(_env_file=None, model_name=str(checkpoint)))
    assert profile.row.name == "LightOnOCR-3-4B"


def test_settings_override_the_profile_and_say_so() -> None:
    settings = load_settings(
        _env_file=None, model_name="lightonai/LightOnOCR-3-4B", temperature=0.1, top_p=0.8, render_longest_edge=1024
    )
    profile = active_profile(settings)
    assert (profile.temperature, profile.top_p, profile.longest_edge) == (0.1, 0.8, 1024)
    assert profile.overridden == ("TEMPERATURE", "TOP_P", "RENDER_LONGEST_EDGE")
    shown = profile.describe()
    assert shown["name"] == "LightOnOCR-3-4B"
    assert shown["longest_edge"] == 1024
    # Empty values in .env mean "the profile's".
    plain = active_profile(load_settings(_env_file=None, temperature="", top_p="", render_longest_edge=""))
    assert (plain.temperature, plain.top_p, plain.longest_edge, plain.overridden) == (0.2, 0.9, 1540, ())


def test_model_profile_names_the_row_for_a_custom_served_name() -> None:
    settings = load_settings(_env_file=None, model_name="ocr", model_profile="lightonocr-3-0.8b")
    assert active_profile(settings).row.name == "LightOnOCR-3-0.8B"
    with pytest.raises(SettingsError, match=r"MODEL_PROFILE: .*LightOnOCR-3-4B"):
        load_settings(_env_file=None, model_profile="LightOnOCR-9")


def test_vllm_commands_are_the_authors() -> None:
    flags = "--limit-mm-per-prompt '{\"image\": 1}' --mm-processor-cache-gb 0 --no-enable-prefix-caching"
    assert PROFILES["lightonocr-2-1b"].vllm_command() == (
        f"vllm serve lightonai/LightOnOCR-2-1B {flags} --max-model-len 16384"
    )
    assert PROFILES["lightonocr-3-4b"].vllm_command() == (
        f"vllm serve lightonai/LightOnOCR-3-4B {flags} --max-model-len 18000 "
        "--default-chat-template-kwargs '{\"enable_thinking\": false}'"
    )

"""Settings: the specified defaults, and start-up errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.profiles import active_profile
from app.settings import Device, ModelSource, SettingsError, load_settings


def test_specified_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(_env_file=None)
    assert settings.project_name == "LightOnOCR-Service"
    assert settings.model_source is ModelSource.HUGGINGFACE
    assert settings.model_name == "lightonai/LightOnOCR-2-1B"
    assert settings.model_cache_dir == Path("Model")
    assert settings.device is Device.CUDA
    assert settings.max_file_size_mb == 10
    assert settings.vllm_base_url == "http://localhost:8001/v1"
    assert (settings.max_new_tokens, settings.temperature, settings.top_p) == (4096, None, None)
    # Sampling and page size come from the default model's profile (app/profiles.py) unless set.
    profile = active_profile(settings)
    assert (profile.temperature, profile.top_p, profile.longest_edge) == (0.2, 0.9, 1540)
    assert settings.max_concurrent_pages == 64
    assert settings.model_version == "lightonocr-2-1b"


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MODEL_SOURCE=vllm\nMAX_PAGES=7\n")
    monkeypatch.setenv("MAX_PAGES", "9")  # the environment wins over .env
    settings = load_settings(_env_file=env_file)
    assert settings.model_source is ModelSource.VLLM
    assert settings.max_pages == 9


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MODEL_SOURCE", "tensorflow"),
        ("DEVICE", "tpu"),
        ("MAX_FILE_SIZE_MB", "-1"),
        ("TEMPERATURE", "hot"),
        ("VLLM_BASE_URL", "localhost:8001"),
        ("MAX_CONCURRENT_PAGES", "0"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(_env_file=None)


def test_local_model_directory_version() -> None:
    assert load_settings(_env_file=None, model_name="/models/LightOnOCR-2-1B/").model_version == "lightonocr-2-1b"


def test_service_refuses_to_start_with_a_clear_message() -> None:
    """`uvicorn app.main:app` with a bad variable exits with the variable's name, not a traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MODEL_SOURCE": "tensorflow"}
    done = subprocess.run(
        [sys.executable, "-c", "import app.main"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 3  # uvicorn's start-up failure: a `--workers` supervisor does not restart it
    assert done.stderr.startswith("LightOnOCR Service cannot start: invalid configuration: MODEL_SOURCE: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_unknown_dotenv_keys_are_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in `.env` (MAX_PAGE for MAX_PAGES) is named at start-up; environment variables are not ours to judge."""
    from app.main import create_app

    env_file = tmp_path / ".env"
    env_file.write_text("MAX_PAGES=7\nMAX_PAGE=3\n# a comment\nhf_token=secret\nlog_level=debug\n")
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "1")
    settings = load_settings(_env_file=env_file, jobs_db=tmp_path / "jobs.db")
    assert settings.max_pages == 7
    assert settings.unknown_env_file_keys == ["MAX_PAGE", "hf_token"]
    with caplog.at_level("WARNING", logger="app.main"):
        create_app(settings)
    [warning] = [record.getMessage() for record in caplog.records if record.name == "app.main"]
    assert "MAX_PAGE, hf_token" in warning
    assert "SOME_UNRELATED_VARIABLE" not in warning
    assert "secret" not in warning


def test_no_dotenv_no_warning(tmp_path: Path) -> None:
    assert load_settings(_env_file=None).unknown_env_file_keys == []
    assert load_settings(_env_file=tmp_path / "missing.env").unknown_env_file_keys == []

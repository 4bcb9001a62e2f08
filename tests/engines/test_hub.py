"""Loading from the hub when it cannot be reached: said early, retried on a schedule, ready without restart.

No network is used: the hub is either switched off (HF_HUB_OFFLINE) or pointed at a closed
loopback port (HF_ENDPOINT=http://127.0.0.1:9). The later success is the cache being filled
by hand with the tiny checkpoint in the hub cache's layout, as `hf download --cache-dir` would.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import huggingface_hub.constants
import pytest

from app.engines import hub
from app.engines.hub import cached_snapshot
from app.engines.huggingface import HuggingFaceEngine
from app.errors import EngineUnavailable
from app.main import create_app
from tests.conftest import make_settings, wait_ready
from tests.support.documents import make_png
from tests.support.server import ServedApp

HUB_ID = "lightonocr-tests/tiny-model"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, checkpoint: Path) -> Path:
    """The hub cache's layout for HUB_ID at REVISION: refs/main names the snapshot holding the files."""
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT at a closed loopback port, hub online: every hub call is refused at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def ready_error(url: str, needle: str, timeout: float = 60.0) -> dict[str, str]:
    """/ready's error once its message contains `needle` (the load runs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{url}/ready")
        assert response.status_code == 503, response.text
        error: dict[str, str] = response.json()["error"]
        if needle in error["message"]:
            return error
        assert time.monotonic() < deadline, f"/ready never said {needle!r}: {error}"
        time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cache = tmp_path / "cache"
    settings = make_settings(
        model_source="huggingface",
        model_name=HUB_ID,
        model_cache_dir=cache,
        device="cpu",
        max_new_tokens=4,
        retry_temperatures="",
        model_load_retry_s=0.05,
    )
    with ServedApp(create_app(settings)) as app:
        yield app.url, cache


@pytest.mark.parametrize(
    ("hub", "says"),
    [("unreachable_hub", "the model hub is unreachable"), ("offline_hub", "HF_HUB_OFFLINE")],
)
def test_hub_out_of_reach_is_said_retried_and_ready_once_the_cache_holds_the_weights(
    request: pytest.FixtureRequest, hub: str, says: str, served: tuple[str, Path], tiny_checkpoint: Path
) -> None:
    request.getfixturevalue(hub)
    url, cache = served
    error = ready_error(url, says)
    assert error["code"] == "engine_unavailable"
    assert "retrying in 0.05 s" in error["message"]
    assert f"hf download {HUB_ID} --cache-dir {cache}" in error["message"]
    assert "127.0.0.1" not in error["message"]  # the address goes to the log
    info = httpx.get(f"{url}/info").json()
    assert info["ready"] is False  # /info agrees with /ready
    # A page is refused with what the engine is doing; one sent while a retry runs says "loading", so ask
    # until the refusal between two attempts is seen (each answer must be a 503 all the same).
    deadline = time.monotonic() + 60
    while True:
        refused = httpx.post(f"{url}/api/inference", files={"file": ("p.png", make_png(100, 100))}, timeout=30)
        assert refused.status_code == 503, refused.text
        if says in refused.json()["error"]["message"]:
            break
        assert time.monotonic() < deadline, f"pages were never refused with {says!r}: {refused.text}"

    fill_cache(cache, tiny_checkpoint)  # as copying a cache filled elsewhere with `hf download` would
    wait_ready(url, timeout=120)  # no restart: the next scheduled attempt finds the weights
    info = httpx.get(f"{url}/info").json()
    assert info["ready"] is True
    assert info["device"] == "cpu"  # the device really used
    page = httpx.post(f"{url}/api/inference", files={"file": ("p.png", make_png(100, 100))}, timeout=60)
    assert page.status_code == 200, page.text


def test_a_complete_cache_is_used_without_the_network(
    unreachable_hub: None, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    cache = tmp_path / "cache"
    snapshot = fill_cache(cache, tiny_checkpoint)
    assert cached_snapshot(HUB_ID, cache) == snapshot
    settings = make_settings(
        model_source="huggingface", model_name=HUB_ID, model_cache_dir=cache, device="cpu", model_load_retry_s=0
    )
    with ServedApp(create_app(settings)) as app:
        wait_ready(app.url, timeout=120)  # the hub is unreachable, yet the model loads at once


@pytest.mark.anyio
async def test_a_local_checkpoint_writes_no_cache_directory(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """MODEL_NAME a local directory: nothing is written, so the service runs from a directory it cannot write
    (the default MODEL_CACHE_DIR, `Model`, is relative to it)."""
    cache = tmp_path / "nowhere" / "Model"
    settings = make_settings(
        model_source="huggingface", model_name=str(tiny_checkpoint), model_cache_dir=cache, device="cpu"
    )
    async with HuggingFaceEngine(settings) as engine:
        await engine.check_health()
    assert not cache.exists()


def test_a_cache_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    blocked = tmp_path / "a-file" / "Model"  # under a regular file: not even root can create it
    with pytest.raises(EngineUnavailable) as raised:
        hub._download(HUB_ID, REVISION, blocked, 0, lambda message: None, "advice")
    assert f"MODEL_CACHE_DIR {str(blocked)!r} cannot be created" in raised.value.message


def test_an_incomplete_cache_is_not_taken_for_the_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    cache = tmp_path / "cache"
    snapshot = fill_cache(cache, tiny_checkpoint)
    (snapshot / "model.safetensors").unlink()
    assert cached_snapshot(HUB_ID, cache) is None
    assert cached_snapshot("other/model", cache) is None


def test_download_progress_counts_bytes_on_disk_against_the_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What /ready and the log say during the first 2 GB download: MB on disk (partial files too) of the total."""
    monkeypatch.setattr(hub, "_PROGRESS_EVERY_S", 0.01)
    monkeypatch.setattr(hub, "_LOG_EVERY_S", 0.0)
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    reports: list[str] = []
    seen = threading.Event()

    def report(message: str) -> None:
        reports.append(message)
        if message.startswith("downloading weights 830/2010 MB"):
            seen.set()

    done = threading.Event()
    watcher = threading.Thread(target=hub._watch_download, args=(repo, 2010 * 1_000_000, report, done))
    with caplog.at_level(logging.INFO, logger="app.engines.hub"):
        watcher.start()
        with (repo / "blobs" / "abc.incomplete").open("wb") as partial:
            partial.truncate(830 * 1_000_000)  # a sparse file: its size, without writing 830 MB
        assert seen.wait(30), reports
        done.set()
        watcher.join(30)
    assert re.fullmatch(r"downloading weights 830/2010 MB, \d+ MB/s", reports[-1])
    assert any("downloading weights 830/2010 MB" in record.getMessage() for record in caplog.records)

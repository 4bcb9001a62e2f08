"""The intake worker pool with real processes: errors as in-process intake, crash isolation, clean shutdown.

Most tests share the session's two-worker pool (`intake_pool`); a worker is killed with SIGKILL
while the gate holds it inside a page, which is what a PDFium crash looks like from outside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from app.errors import CorruptDocument, IntakeWorkerCrashed, PasswordRequired, RenderTimeout, UnsupportedMediaType
from app.imaging import page_png
from app.intake import EncodedPage, IntakeLimits, open_document
from app.intake.pool import IntakePool
from tests.support.documents import make_pdf, small_pdf
from tests.support.intake_gate import Gate

LIMITS = IntakeLimits(max_image_pixels=100_000_000)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: only its parent has not collected it yet. It may be collected while we read.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_dead(pids: list[int]) -> None:
    """Until the processes have exited (their sockets closed): polling the kernel, not a timing assumption."""
    while any(_alive(pid) for pid in pids):
        time.sleep(0.01)


@pytest.mark.anyio
async def test_document_errors_come_back_as_the_same_errors(intake_pool: IntakePool) -> None:
    with pytest.raises(UnsupportedMediaType):
        await intake_pool.open(b"hello, not a document", limits=LIMITS)
    with pytest.raises(CorruptDocument):
        await intake_pool.open(b"%PDF-1.7\nnot really", limits=LIMITS)
    with pytest.raises(PasswordRequired) as raised:
        await intake_pool.open(make_pdf(1, password="secret"), limits=LIMITS)
    assert raised.value.status == 422
    document = await intake_pool.open(make_pdf(2, password="secret"), limits=LIMITS, password="secret")
    try:
        assert document.page_count == 2
        page = await document.page(1, png_min_side=28)
        assert isinstance(page, EncodedPage)
        assert page.size == (1190, 1540)
    finally:
        document.close()


@pytest.mark.anyio
async def test_the_document_goes_once_to_a_temp_file_removed_on_close(intake_pool: IntakePool) -> None:
    before = set(os.listdir(intake_pool.directory))
    document = await intake_pool.open(small_pdf(3), limits=LIMITS)
    files = set(os.listdir(intake_pool.directory)) - before
    assert len(files) == 1
    path = Path(intake_pool.directory) / files.pop()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == small_pdf(3)
    await asyncio.gather(*(document.page(index, png_min_side=28) for index in range(3)))
    document.close()
    assert not path.exists()


@pytest.mark.anyio
async def test_a_killed_worker_fails_only_its_page(intake_pool: IntakePool, gate: Gate) -> None:
    """SIGKILL mid-page: that page raises intake_worker_crashed, the other worker's pages carry on, and the
    pool serves again with a fresh process in the dead one's place."""
    gate.hold(3, 1)
    held = await intake_pool.open(small_pdf(3), limits=LIMITS)
    other = await intake_pool.open(small_pdf(2), limits=LIMITS)
    try:
        doomed = asyncio.create_task(held.page(1, png_min_side=28))
        pid = await asyncio.to_thread(gate.started, 3, 1)
        # The other worker is free and keeps serving while one is held.
        survivors = await asyncio.gather(*(other.page(index, png_min_side=28) for index in range(2)))
        assert all(isinstance(page, EncodedPage) for page in survivors)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(IntakeWorkerCrashed) as raised:
            await doomed
        assert raised.value.code == "intake_worker_crashed"
        assert raised.value.details["exit_code"] == -signal.SIGKILL
        gate.release()
        assert pid not in intake_pool.pids()
        assert len(intake_pool.pids()) == 2
        # Both workers serve again: four pages at once need both.
        pages = await asyncio.gather(*(held.page(index % 3, png_min_side=28) for index in range(4)))
        assert all(isinstance(page, EncodedPage) for page in pages)
    finally:
        held.close()
        other.close()


@pytest.mark.anyio
async def test_a_worker_killed_between_pages_costs_no_page(intake_pool: IntakePool) -> None:
    """A worker that died idle never held a page: the next page goes to its replacement and succeeds."""
    document = await intake_pool.open(small_pdf(2), limits=LIMITS)
    try:
        pids = intake_pool.pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(_wait_dead, pids)
        pages = await asyncio.gather(*(document.page(index, png_min_side=28) for index in range(2)))
        assert all(isinstance(page, EncodedPage) for page in pages)
    finally:
        document.close()


@pytest.mark.anyio
async def test_a_cancelled_page_frees_its_worker(intake_pool: IntakePool, gate: Gate) -> None:
    """The caller may leave (client disconnect); the worker finishes the page and serves the next one."""
    gate.hold(4, 0)
    document = await intake_pool.open(small_pdf(4), limits=LIMITS)
    try:
        waiting = asyncio.create_task(document.page(0, png_min_side=28))
        await asyncio.to_thread(gate.started, 4, 0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.release()
        pages = await asyncio.gather(*(document.page(index, png_min_side=28) for index in range(4)))
        assert len(pages) == 4
    finally:
        document.close()


@pytest.mark.anyio
async def test_a_page_stuck_past_the_timeout_fails_alone_and_its_worker_is_replaced(gate: Gate) -> None:
    """INTAKE_TIMEOUT_S: a page the renderer never finishes fails with render_timeout (422); the stuck worker is
    killed (a thread could not be), a fresh one takes its slot, and the document's other pages are read."""
    pool = IntakePool(1, handler=gate.handler, timeout_s=0.5)
    try:
        pool.start()
        gate.hold(3, 1)
        document = await pool.open(small_pdf(3), limits=LIMITS)
        try:
            stuck_pid = pool.pids()
            with pytest.raises(RenderTimeout) as raised:
                await document.page(1, png_min_side=28)
            assert (raised.value.status, raised.value.code) == (422, "render_timeout")
            assert raised.value.details == {"timeout_s": 0.5}
            await asyncio.to_thread(_wait_dead, stuck_pid)  # killed, not left running
            assert len(pool.pids()) == 1
            assert pool.pids() != stuck_pid
            gate.release()
            pages = await asyncio.gather(*(document.page(index, png_min_side=28) for index in (0, 2)))
            assert all(isinstance(page, EncodedPage) for page in pages)
        finally:
            document.close()
    finally:
        gate.release()
        pool.close()


def test_close_leaves_no_process_and_no_file() -> None:
    pool = IntakePool(1)
    pool.start()
    pids = pool.pids()
    directory = pool.directory

    async def one_page() -> None:
        document = await pool.open(small_pdf(1), limits=LIMITS)
        await document.page(0, png_min_side=None)  # the document stays open: close() must clean it up

    asyncio.run(one_page())
    pool.close()
    assert pids
    assert not any(_alive(pid) for pid in pids)
    assert not Path(directory).exists()


@pytest.mark.anyio
async def test_page_png_from_a_thread_is_the_in_process_png(intake_pool: IntakePool) -> None:
    """The web page's previews and a job's page image (`page_png`, in a thread) get the worker's PNG: same bytes."""
    data = small_pdf(2)
    pooled = await intake_pool.open(data, limits=LIMITS)
    local = open_document(data, limits=LIMITS)
    try:
        png, size = await asyncio.to_thread(page_png, pooled, 1)
        assert (png, size) == page_png(local, 1)
        image = await asyncio.to_thread(pooled.render, 1)
        assert image.tobytes() == local.render(1).tobytes()
    finally:
        pooled.close()
        local.close()

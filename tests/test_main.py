"""Starting `uvicorn app.main:app` for real: a bad configuration is one line and an exit, not a traceback or a loop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from app.settings import SettingsError, check_jobs_db

ROOT = Path(__file__).resolve().parents[1]
NOBODY = "65534"


def start(cwd: Path, env: dict[str, str], prefix: Sequence[str] = (), *args: str) -> subprocess.CompletedProcess[str]:
    """Run the documented command in `cwd` (no `.env` there); a healthy start would run until the timeout."""
    environment = {key: value for key, value in os.environ.items() if key != "JOBS_DB"}
    environment.update(PYTHONPATH=str(ROOT), MODEL_SOURCE="vllm", VLLM_BASE_URL="http://127.0.0.1:9/v1", **env)
    command = [*prefix, sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=90, check=False)


def assert_one_line_naming(done: subprocess.CompletedProcess[str], variable: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, done.stderr  # uvicorn's start-up failure: its supervisor does not restart it
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("LightOnOCR Service cannot start: invalid configuration: " + variable), lines[0]
    assert "Traceback" not in done.stderr


def test_jobs_db_under_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    """Fails for root too: a regular file cannot be a directory."""
    (tmp_path / "not-a-directory").write_text("")
    done = start(tmp_path, {"JOBS_DB": str(tmp_path / "not-a-directory" / "jobs.db")})
    assert_one_line_naming(done, "JOBS_DB")
    assert "not-a-directory is not a directory" in done.stderr


@pytest.fixture
def unwritable_cwd() -> Iterator[tuple[Path, list[str]]]:
    """A working directory this user cannot write, as `/app` is for the image's uid 10001.

    As root, a mode bit does not stop writes: the service then runs as nobody through setpriv,
    which needs an interpreter nobody can execute (skipped where it lives under /root).
    """
    directory = Path(tempfile.mkdtemp(prefix="lightonocr-ro-"))
    directory.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop the privilege that ignores mode bits")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [*prefix, sys.executable, "-c", "import app.settings"]
        probe = subprocess.run(command, cwd=directory, env=env, capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot run this interpreter and checkout: {probe.stderr.decode()[-200:]}")
    try:
        yield directory, prefix
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def test_default_jobs_db_in_an_unwritable_directory_is_a_one_line_error(
    unwritable_cwd: tuple[Path, list[str]],
) -> None:
    """The Docker bug: JOBS_DB's default `jobs.db` in a working directory the user cannot write."""
    directory, prefix = unwritable_cwd
    done = start(directory, {}, prefix)
    assert_one_line_naming(done, "JOBS_DB")
    assert "is not writable" in done.stderr
    assert os.listdir(directory) == []


def test_check_creates_the_directory_but_not_the_database(tmp_path: Path) -> None:
    """The store creates its file on the first job; the start-up check leaves nothing behind but the directory."""
    path = tmp_path / "data" / "jobs" / "jobs.db"
    check_jobs_db(path)
    assert path.parent.is_dir()
    assert os.listdir(path.parent) == []


def test_check_refuses_a_directory_and_an_unwritable_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^invalid configuration: JOBS_DB: .* is a directory"):
        check_jobs_db(tmp_path)
    if os.geteuid() != 0:  # root may write any file
        path = tmp_path / "jobs.db"
        path.write_text("")
        path.chmod(0o400)
        with pytest.raises(SettingsError, match="JOBS_DB: cannot write"):
            check_jobs_db(path)


def test_several_workers_are_refused(tmp_path: Path) -> None:
    """`--workers 2`: each worker would load its own model and keep its own /metrics (scrapes alternate: 2, 4, 2, 4)."""
    done = start(tmp_path, {"JOBS_DB": str(tmp_path / "jobs.db")}, (), "--workers", "2")
    refusals = [line for line in done.stderr.splitlines() if line.startswith("LightOnOCR Service cannot start")]
    assert refusals, done.stderr
    assert "--workers 2: run one worker per process" in refusals[0]
    assert "replicas" in refusals[0]
    assert "Traceback" not in done.stderr


def test_workers_are_read_from_the_importing_uvicorn() -> None:
    """The count comes from the uvicorn `Config` up the stack (uvicorn imports the app from inside it)."""
    import uvicorn

    from app.main import refuse_several_workers, uvicorn_workers

    assert uvicorn_workers() == 1
    config = uvicorn.Config("app.main:app", workers=3)
    assert uvicorn_workers() == config.workers == 3
    config.reload = True  # uvicorn then runs one process and ignores --workers
    assert uvicorn_workers() == 1
    config.reload = False
    refuse_several_workers(1)
    with pytest.raises(SettingsError, match="--workers 3"):
        refuse_several_workers(uvicorn_workers())

"""A real, throwaway PostgreSQL server for tests (Debian's binaries, a temp data dir, a free loopback port).

One server per test session (`postgres_server`, session-scoped); each test gets a fresh database of its own
(`postgres_url`: `CREATE DATABASE`, dropped after the test), so the suite stays fast and tests stay apart.
Tests that stop and start the server (database lost while running) start their own with `PostgresServer.start`.

PostgreSQL refuses to run as root: when the tests run as root the server runs as the `postgres` system user
(`setpriv`), in a data directory handed to that user. When the binaries are missing and we are root, they are
installed with apt-get once; otherwise the tests that need PostgreSQL skip, saying exactly why.

Use it from a conftest or a test module:

    from tests.support.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER = "ocr"
PASSWORD = "ocr-test-secret"  # the URL carries it, so tests can check it is never shown
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """Why no PostgreSQL server can be had here (the skip reason)."""


def _bin_dir() -> Path | None:
    """The newest Debian PostgreSQL binaries, or None."""
    found = [Path(path) for path in glob.glob(_BIN_GLOB) if (Path(path) / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)


def find_binaries(*, install: bool = True) -> Path:
    """initdb/pg_ctl's directory; installs Debian's `postgresql` when missing and we are root, else raises."""
    found = _bin_dir()
    if found is not None:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        why = "not root" if os.geteuid() != 0 else "no apt-get"
        raise PostgresUnavailable(
            f"PostgreSQL binaries not found under {_BIN_GLOB} and cannot be installed here ({why}); "
            "install Debian's `postgresql` package (.ci/run does when it can)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise PostgresUnavailable(f"PostgreSQL is missing and `apt-get install postgresql` failed: {exc}") from exc
    found = _bin_dir()
    if found is None:
        raise PostgresUnavailable(f"`apt-get install postgresql` ran but no initdb under {_BIN_GLOB}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """One running server: `url()` for a database on it, `create_database()` for a fresh one, `stop()`/`start()`."""

    bin_dir: Path
    data_dir: Path
    port: int
    as_user: list[str] = field(default_factory=list)  # setpriv prefix when we are root
    durable: bool = False  # True: PostgreSQL's default fsync/commit settings (benchmarks); False: fast, throwaway
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.data_dir.parent / "postgres.log"

    @classmethod
    def start_new(cls, root: Path, *, install: bool = True, durable: bool = False) -> PostgresServer:
        """initdb a data dir under `root` and start a server on a free loopback port (a few seconds)."""
        bin_dir = find_binaries(install=install)
        as_user: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, and no `postgres` user to run the server as") from None
            as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
            os.chown(root, pw.pw_uid, pw.pw_gid)
        data_dir = root / "data"
        pwfile = root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if as_user:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        initdb = [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-sync",
        ]
        done = subprocess.run(initdb, capture_output=True, text=True, timeout=120, cwd=root)
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        server = cls(bin_dir=bin_dir, data_dir=data_dir, port=free_port(), as_user=as_user, durable=durable)
        server.start()
        return server

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.data_dir.parent,
        )

    def start(self) -> None:
        # Test settings: loopback only, socket in the data dir (not /var/run), no fsync (throwaway data).
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.data_dir}' "
            "-c max_connections=300"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        done = self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options)
        if done.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-1000:] if self.log_file.exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed ({done.returncode}): {done.stderr.strip()} {log}")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode, "-w")

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())  # DDL built from our own identifiers

    def create_database(self) -> str:
        """A fresh empty database; answers its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(Exception):
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """A server of one's own (stopped and removed by `destroy()`), or `pytest.skip` with the reason."""
    root = Path(tempfile.mkdtemp(prefix="lightonocr-pg-"))
    os.chmod(root, 0o755)
    try:
        return PostgresServer.start_new(root)
    except PostgresUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server: {exc}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server (with the password in the URL), dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)

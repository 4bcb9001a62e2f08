"""Several real service processes (uvicorn) on one job store: start, kill -9, start again.

Used by the replica tests and by `bench/replicas.py`. Each replica is `python -m uvicorn app.main:app` on a free
loopback port, with the vLLM stand-in as engine; its output goes to a log file that failures quote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.http import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Replica:
    name: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Replica:
        command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as output:
            output.write(f"\n===== {self.name} start {self.starts + 1} =====\n".encode())
            output.flush()
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=output, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        """Until /ready answers 200 (engine reachable, store open)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never became ready:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def kill9(self) -> None:
        """kill -9: no shutdown, no lease released, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def replica_env(engine_url: str, jobs_db: str, **settings: str) -> dict[str, str]:
    """The environment of one replica: the stand-in as engine, JOBS_DB shared, keys off, quiet logs."""
    return {
        **os.environ,
        "MODEL_SOURCE": "vllm",
        "VLLM_BASE_URL": engine_url,
        "JOBS_DB": jobs_db,
        "VLLM_RETRY_BACKOFF_S": "0.01",
        "API_KEYS": "",
        "API_KEYS_FILE": "",
        "LOG_LEVEL": "WARNING",
        **settings,
    }


def start_cluster(names: list[str], env: dict[str, str], logs: Path) -> list[Replica]:
    """Start every replica, then wait for all of them (they start in parallel)."""
    logs.mkdir(parents=True, exist_ok=True)
    replicas = [Replica(name, env, logs / f"{name}.log").start() for name in names]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.kill9()
        raise
    return replicas

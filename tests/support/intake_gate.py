"""An intake worker handler that holds chosen pages until the test releases them: a worker busy with a page.

The handler runs in the worker processes (the pool pickles it by reference), so it talks to the
test through files in `gate_dir`: `hold(pages, index)` makes page `index` (0-based) of any
`pages`-page document wait after writing `started-<pages>-<index>` (holding the worker's pid),
until `release()`. A test can then kill exactly the worker holding that page.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from app.intake import worker
from app.intake.worker import PageRequest, Reply, Request

MAX_HOLD_S = 60.0  # a forgotten release must not hang the suite


@dataclass(frozen=True, slots=True)
class GatedHandler:
    gate_dir: str

    def __call__(self, request: Request) -> Reply:
        if isinstance(request, PageRequest):
            document = worker.open_cached(request.path, request.password, request.limits)
            name = f"{document.page_count}-{request.index}"
            gate = Path(self.gate_dir)
            release = gate / f"hold-{name}"
            if release.exists():
                (gate / f"started-{name}.tmp").write_text(str(os.getpid()))
                (gate / f"started-{name}.tmp").rename(gate / f"started-{name}")
                deadline = time.monotonic() + MAX_HOLD_S
                while release.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)  # polling a file across processes; not a timing assertion
        return worker.handle(request)


class Gate:
    """The test's side of `GatedHandler`."""

    def __init__(self, gate_dir: Path) -> None:
        self.dir = gate_dir
        self.handler = GatedHandler(str(gate_dir))

    def hold(self, pages: int, index: int) -> None:
        (self.dir / f"hold-{pages}-{index}").touch()

    def started(self, pages: int, index: int, timeout: float = 60.0) -> int:
        """Wait until a worker holds that page; its pid."""
        path = self.dir / f"started-{pages}-{index}"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker started page {index} of a {pages}-page document")
            time.sleep(0.01)
        return int(path.read_text())

    def release(self) -> None:
        for path in self.dir.iterdir():
            if path.name.startswith(("hold-", "started-")):
                path.unlink()

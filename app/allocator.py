"""glibc's malloc tuned for rendered pages, however the service is started.

Each rendered page is a ~5.5 MB buffer. With glibc's default the mmap threshold rises
once such a block is freed, so later pages come from the heap, which fragments and is
kept: RSS grew with the page count (1 GiB for 300 pages, docs/benchmarks.md §3). Fixing
the threshold at 1 MiB sends big buffers to mmap and back to the OS when freed. The
Docker image sets `MALLOC_MMAP_THRESHOLD_` for that; this applies the same setting when
the service is started some other way (`uvicorn app.main:app`, `lightonocr serve`).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from typing import Literal

MMAP_THRESHOLD = 1024 * 1024  # bytes; the Docker image's MALLOC_MMAP_THRESHOLD_=1048576
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
ENVIRONMENT_VARIABLE = "MALLOC_MMAP_THRESHOLD_"

Outcome = Literal["applied", "environment", "unsupported", "failed"]


def tune_allocator(environ: Mapping[str, str] = os.environ) -> Outcome:
    """Fix glibc's mmap threshold at 1 MiB unless the environment already chose one.

    `environment`: MALLOC_MMAP_THRESHOLD_ is set, and glibc applied it when the process
    started (the operator's value wins). `unsupported`: not glibc (macOS, musl), nothing done.
    """
    if ENVIRONMENT_VARIABLE in environ:
        return "environment"
    if not sys.platform.startswith("linux"):
        return "unsupported"
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, glibc's included
    except OSError:  # pragma: no cover - no dynamic loader
        return "unsupported"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return "unsupported"  # musl has a mallopt that does nothing
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return "applied" if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 else "failed"

"""Shared helpers for the hand-run benchmarks: machine details, timing and table printing.

Benchmarks print a small plain-text table that can be pasted into docs/benchmarks.md,
preceded by the machine line, because on a shared 2-core box the load is part of
the result.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def memory_mib() -> tuple[int, int]:
    """(total, available) MiB from /proc/meminfo; (0, 0) where it does not exist."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) // 1024
    except OSError:
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_line() -> str:
    """One line naming what the numbers depend on: cores, memory, versions, load."""
    total, available = memory_mib()
    return (
        f"machine: {platform.machine()} nproc={os.cpu_count()} mem={total} MiB (avail {available}) "
        f"python={platform.python_version()} torch={package_version('torch')} "
        f"transformers={package_version('transformers')} pillow={package_version('pillow')} "
        f"pypdfium2={package_version('pypdfium2')} load={load_average()}"
    )


def print_header(title: str) -> None:
    print(f"# {title}")
    print(machine_line())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown pipe table (pastes into docs as is), columns padded for the terminal."""
    cells = [[str(h) for h in headers], *[[_fmt(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with few samples it is an observed value."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def cpu_ms(fn: Callable[[], T]) -> tuple[T, float]:
    """Result and CPU milliseconds of this thread: per-core cost, less sensitive to neighbours' load."""
    start = time.thread_time()
    result = fn()
    return result, (time.thread_time() - start) * 1e3


@contextmanager
def wall() -> Iterator[list[float]]:
    """`with wall() as elapsed: ...` then `elapsed[0]` is the block's wall seconds."""
    elapsed: list[float] = []
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.append(time.perf_counter() - start)


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

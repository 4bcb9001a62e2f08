"""Where the huggingface engine's weights come from: a local directory, the cache, or the hub.

A hub id is looked up in MODEL_CACHE_DIR first, without the network: a machine that
has the weights starts offline at once. Otherwise one quick request (`model_info`, 10 s
timeout) tells an unreachable or offline hub apart before any download starts, and the
download (2 GB for LightOnOCR-2-1B) reports its progress. Every failure is an
`EngineUnavailable` whose message says what is happening and what to do; the engine
retries on a schedule (MODEL_LOAD_RETRY_S). Blocking: run in a worker thread.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.errors import EngineUnavailable

log = logging.getLogger(__name__)

_CHECK_TIMEOUT_S = 10.0
_PROGRESS_EVERY_S = 2.0  # how often /ready's message is refreshed during a download
_LOG_EVERY_S = 15.0  # how often the download's progress is logged
_MB = 1_000_000
# What loading needs: configs, tokenizer, chat template and safetensors weights (not READMEs, pictures
# or other weight formats a repository may also hold).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]

Report = Callable[[str], None]


def looks_like_path(name: str) -> bool:
    """Hub ids are `org/name`; anything absolute, relative-dotted or home-based is meant as a directory."""
    return name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1


def resolve_checkpoint(model_name: str, cache_dir: Path, report: Report) -> Path:
    """The directory holding the checkpoint, downloading it into `cache_dir` when needed."""
    if looks_like_path(model_name) or Path(model_name).is_dir():
        path = Path(model_name).expanduser()
        if not path.is_dir():
            raise EngineUnavailable(
                f"MODEL_NAME {model_name!r} looks like a local directory but none exists there. Fill it with "
                f"`hf download lightonai/LightOnOCR-2-1B --local-dir {model_name}` (on a machine with "
                "network access, then copy it), or set MODEL_NAME to a hub id."
            )
        return path
    cached = cached_snapshot(model_name, cache_dir)
    if cached is not None:
        log.info("using %s from the cache in %s (no network needed)", model_name, cache_dir)
        return cached
    advice = (
        f"download it on a machine with network access with `hf download {model_name} --cache-dir {cache_dir}` "
        "and copy the cache here, or set MODEL_NAME to a local directory holding the checkpoint"
    )
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise EngineUnavailable(
            f"the hub is switched off (HF_HUB_OFFLINE) and {cache_dir} does not hold {model_name!r}: {advice}"
        )
    report(f"checking the hub for {model_name}")
    try:
        info = HfApi().model_info(model_name, timeout=_CHECK_TIMEOUT_S, files_metadata=True)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        log.warning("the hub refused %s: %s", model_name, exc)
        raise EngineUnavailable(
            f"the hub has no model {model_name!r} this machine may read (check MODEL_NAME, or log in for a gated "
            f"model); or {advice}"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        log.warning("the hub at %s answered HTTP %s for %s: %s", constants.ENDPOINT, status, model_name, exc)
        raise EngineUnavailable(f"the model hub answered HTTP {status} for {model_name!r}; or {advice}") from None
    except Exception as exc:  # connection refused, DNS, timeout, proxy: the hub cannot be reached
        log.warning("the hub at %s is unreachable: %s: %s", constants.ENDPOINT, type(exc).__name__, exc)
        raise EngineUnavailable(f"the model hub is unreachable (HF_ENDPOINT); {advice}") from None
    total = sum(
        sibling.size or 0
        for sibling in info.siblings or []
        if any(fnmatch.fnmatch(sibling.rfilename, pattern) for pattern in CHECKPOINT_FILES)
    )
    return _download(model_name, info.sha, cache_dir, total, report, advice)


def cached_snapshot(model_name: str, cache_dir: Path) -> Path | None:
    """The cached snapshot of `model_name`'s main revision, if it holds a complete checkpoint."""
    repo = cache_dir / f"models--{model_name.replace('/', '--')}"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    if not (snapshot / "config.json").is_file():
        return None
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return snapshot if all((snapshot / shard).is_file() for shard in shards) else None
    return snapshot if (snapshot / "model.safetensors").is_file() else None


def _download(model_name: str, revision: str | None, cache_dir: Path, total: int, report: Report, advice: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # only a download writes the cache: a local MODEL_NAME or a filled cache runs from a read-only place
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineUnavailable(
            f"MODEL_CACHE_DIR {str(cache_dir)!r} cannot be created ({exc.strerror or exc}): point it at a writable "
            f"directory to download {model_name!r} into, or set MODEL_NAME to a local directory holding the checkpoint"
        ) from None
    repo = cache_dir / f"models--{model_name.replace('/', '--')}"
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_download, args=(repo, total, report, done), name="hub-download-progress", daemon=True
    )
    log.info("downloading %s (%d MB) into %s", model_name, total // _MB, cache_dir)
    watcher.start()
    try:
        path = snapshot_download(model_name, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES)
    except Exception as exc:
        log.warning("downloading %s failed: %s: %s", model_name, type(exc).__name__, exc)
        raise EngineUnavailable(f"downloading {model_name!r} failed ({type(exc).__name__}); or {advice}") from None
    finally:
        done.set()
        watcher.join()
    log.info("downloaded %s", model_name)
    return Path(str(path))


def _watch_download(repo: Path, total: int, report: Report, done: threading.Event) -> None:
    """Report the bytes on disk (finished and partial files) against the total, and the rate."""
    started = last_log = time.monotonic()
    start_bytes = _bytes_under(repo)
    while not done.wait(_PROGRESS_EVERY_S):
        now = time.monotonic()
        have = _bytes_under(repo)
        rate = (have - start_bytes) / max(now - started, 1e-9)
        message = f"downloading weights {have // _MB}/{total // _MB} MB, {rate / _MB:.0f} MB/s"
        report(message)
        if now - last_log >= _LOG_EVERY_S:
            log.info("%s", message)
            last_log = now


def _bytes_under(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total

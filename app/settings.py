"""All configuration, read once from the environment and `.env`.

Nothing else in the code base reads environment variables: every module gets
what it needs from a `Settings` instance, so a bad value fails at start-up with
the variable's name instead of deep inside a request.
"""

from __future__ import annotations

import os
import tempfile
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from dotenv import dotenv_values  # python-dotenv: what pydantic-settings itself reads `.env` with
from pydantic import BeforeValidator, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ModelSource(StrEnum):
    HUGGINGFACE = "huggingface"
    VLLM = "vllm"
    OPENAI = "openai"  # any OpenAI-compatible server (llama.cpp's llama-server, mlx-vlm): the vLLM engine


class Device(StrEnum):
    CUDA = "cuda"
    CPU = "cpu"
    MPS = "mps"


class HfDtype(StrEnum):
    AUTO = "auto"  # bf16 where the hardware computes in it (CUDA, CPUs with AVX512-BF16 or AMX), else float32
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
# Lists come as comma-separated strings in the environment (`A,B,C`), not JSON.
CommaList = Annotated[list[str], NoDecode]
FloatList = Annotated[list[float], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _path_text(value: object) -> object:
    """JOBS_DB is a file path or a URL: a `Path` given in code is kept as its text."""
    return str(value) if isinstance(value, os.PathLike) else value


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set), not the machine's: INTAKE_WORKERS' default."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Service settings; each field is the lower-case name of its environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        protected_namespaces=(),
    )

    # From the original specification.
    project_name: str = "LightOnOCR-Service"
    model_source: ModelSource = ModelSource.HUGGINGFACE
    model_name: str = "lightonai/LightOnOCR-2-1B"
    model_cache_dir: Path = Path("Model")
    # huggingface engine: seconds between load attempts while the hub is unreachable or the weights are
    # missing (0: fail once and stay unavailable).
    model_load_retry_s: Annotated[float, Field(ge=0)] = 30
    device: Device = Device.CUDA
    max_file_size_mb: PositiveFloat = 10

    # Model profile (app/profiles.py): page size and sampling come from the checkpoint's row of the
    # table, found by MODEL_NAME; MODEL_PROFILE names the row when the served name does not say
    # (a custom --served-model-name). The three settings below override the row's values when set.
    model_profile: str | None = None
    render_longest_edge: Annotated[int, Field(ge=28, le=8192)] | None = None

    # Generation (REFERENCE.md: the authors sample at 0.2 and top_p 0.9 or 1.0; a bound is always sent).
    max_new_tokens: PositiveInt = 4096
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None

    # Runaway generations: a page that hits the token limit or loops is retried at these
    # temperatures in turn (bounded attempts), and the best attempt is kept.
    retry_temperatures: Annotated[FloatList, Field(max_length=5)] = [0.4, 0.7]
    # A document fails as a whole when more than this share of its pages failed.
    max_failed_page_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5

    # Overload and time.
    max_queued_pages: PositiveInt = 1024
    request_timeout_s: PositiveFloat = 900
    shutdown_grace_s: PositiveFloat = 30

    # Keys and per-client limits.
    api_keys: CommaList = []
    api_keys_file: Path | None = None
    key_max_pages_in_flight: PositiveInt | None = 256
    rate_limit_pages_per_min: PositiveInt | None = None
    cors_origins: CommaList = []

    # Documents.
    max_pages: PositiveInt = 100
    max_image_pixels: PositiveInt = 80_000_000
    max_field_size_kb: PositiveInt = 64
    # An upload is cut when no byte arrives for UPLOAD_IDLE_TIMEOUT_S, or when it is still arriving after
    # UPLOAD_TIMEOUT_S (a cap generous enough for MAX_FILE_SIZE_MB at 15 KB/s).
    upload_idle_timeout_s: PositiveFloat = 30
    upload_timeout_s: PositiveFloat = 900

    # vLLM engine.
    vllm_base_url: str = "http://localhost:8001/v1"
    vllm_api_key: str | None = None
    max_concurrent_pages: PositiveInt = 64
    vllm_page_timeout_s: PositiveFloat = 600
    vllm_max_retries: Annotated[int, Field(ge=0, le=10)] = 3
    vllm_retry_backoff_s: Annotated[float, Field(ge=0)] = 0.5

    # Page intake (render, normalise, PNG-encode) in this many worker processes; 0: threads in the service
    # process; unset: one per usable core (`intake_worker_count`).
    intake_workers: Annotated[int, Field(ge=0, le=256)] | None = None
    # A page that a worker has not rendered after this long fails (render_timeout) and its worker is killed.
    intake_timeout_s: PositiveFloat = 60

    # Hugging Face engine.
    hf_dtype: HfDtype = HfDtype.AUTO
    hf_max_batch_size: PositiveInt = 8
    hf_batch_wait_ms: Annotated[float, Field(ge=0)] = 5

    # Probes.
    retry_after_s: PositiveInt = 5

    # Durable jobs (POST /api/jobs): SQLite file or PostgreSQL URL, parallel page batches, leases, retention,
    # storage bound, webhooks.
    jobs_db: Annotated[str, BeforeValidator(_path_text)] = "jobs.db"
    jobs_db_pool_size: PositiveInt = 10
    jobs_concurrency: PositiveInt = 4
    jobs_claim_batch: PositiveInt = 8
    job_lease_s: Annotated[float, Field(ge=1)] = 30
    jobs_ttl_hours: PositiveFloat = 24
    jobs_max_bytes: PositiveInt = 1024 * 1024 * 1024
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    webhook_backoff_s: Annotated[float, Field(ge=0)] = 1
    webhook_timeout_s: PositiveFloat = 10

    # Operations: logs, and where `lightonocr serve` listens.
    log_format: LogFormat = LogFormat.TEXT
    log_level: LogLevel = LogLevel.INFO
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000

    # `.env` keys that name no setting (pydantic-settings ignores them silently); logged at start-up.
    _unknown_env_file_keys: list[str] = PrivateAttr(default_factory=list)

    @property
    def unknown_env_file_keys(self) -> list[str]:
        return list(self._unknown_env_file_keys)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("retry_temperatures", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("retry_temperatures")
    @classmethod
    def _temperatures_in_range(cls, value: list[float]) -> list[float]:
        if any(not 0 <= t <= 2 for t in value):
            raise ValueError("temperatures must be between 0 and 2")
        return value

    @field_validator("vllm_base_url")
    @classmethod
    def _url_has_scheme(cls, value: str) -> str:
        """One URL, or a comma-separated fleet; each may end in `#capacity=N` (its own MAX_CONCURRENT_PAGES)."""
        urls = [item.strip() for item in value.split(",") if item.strip()]
        if not urls:
            raise ValueError("must name at least one URL")
        for url in urls:
            parse_vllm_endpoint(url)
        return ",".join(url.rstrip("/") for url in urls)

    @property
    def vllm_endpoints(self) -> list[tuple[str, int]]:
        """(base URL, pages in flight) for each vLLM server of VLLM_BASE_URL."""
        endpoints = [parse_vllm_endpoint(url) for url in self.vllm_base_url.split(",")]
        return [(url, capacity or self.max_concurrent_pages) for url, capacity in endpoints]

    @field_validator("model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator(
        "vllm_api_key",
        "api_keys_file",
        "key_max_pages_in_flight",
        "rate_limit_pages_per_min",
        "webhook_secret",
        "model_profile",
        "render_longest_edge",
        "temperature",
        "top_p",
        "intake_workers",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("model_profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        from app.profiles import all_profiles, find_profile

        if value is not None and find_profile(value) is None:
            names = ", ".join(row.name for row in all_profiles())
            raise ValueError(f"not a checkpoint of the profile table; one of {names}")
        return value

    @property
    def intake_worker_count(self) -> int:
        """INTAKE_WORKERS, or the usable cores when unset (0: intake in threads of the service process)."""
        return usable_cores() if self.intake_workers is None else self.intake_workers

    def load_api_keys(self) -> frozenset[str]:
        """API_KEYS plus one key per non-blank, non-comment line of API_KEYS_FILE."""
        keys = set(self.api_keys)
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SettingsError(f"API_KEYS_FILE: cannot read {self.api_keys_file}: {exc}") from None
            keys.update(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        return frozenset(keys)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_size_mb * 1024 * 1024)

    @property
    def model_version(self) -> str:
        """Short model name for responses: `lightonai/LightOnOCR-2-1B` -> `lightonocr-2-1b`."""
        return short_model_name(self.model_name)


def short_model_name(name: str) -> str:
    """`lightonai/LightOnOCR-2-1B` -> `lightonocr-2-1b` (also for the name an OpenAI-compatible server lists)."""
    return Path(name.rstrip("/")).name.lower()


def parse_vllm_endpoint(item: str) -> tuple[str, int | None]:
    """`http://host:8001/v1#capacity=32` -> (`http://host:8001/v1`, 32); no fragment -> (url, None)."""
    url, _, fragment = item.strip().partition("#")
    if not url.startswith(("http://", "https://")):
        raise ValueError("each URL must start with http:// or https://")
    capacity: int | None = None
    if fragment:
        key, _, number = fragment.partition("=")
        if key != "capacity" or not number.isdigit() or int(number) < 1:
            raise ValueError(f"{item!r}: the only fragment understood is #capacity=N (N >= 1)")
        capacity = int(number)
    return url.rstrip("/"), capacity


class SettingsError(Exception):
    """Configuration is invalid; the message names every offending variable."""


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's report into one readable message per variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "?"
            lines.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
        raise SettingsError(_configuration_error(lines)) from None
    settings._unknown_env_file_keys = unknown_env_file_keys(
        overrides.get("_env_file", Settings.model_config["env_file"])
    )
    return settings


def unknown_env_file_keys(env_file: object) -> list[str]:
    """Keys of the `.env` file(s) that match no setting, as written: a typo there is otherwise silently ignored.

    Only the file's keys: environment variables are the whole machine's, most of them not ours.
    """
    if env_file is None:
        return []
    files = [env_file] if isinstance(env_file, str | os.PathLike) else list(env_file)  # type: ignore[call-overload]
    known = set(Settings.model_fields)
    unknown: list[str] = []
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            continue
        for key in dotenv_values(path, encoding="utf-8"):
            if key.lower() not in known and key not in unknown:
                unknown.append(key)
    return unknown


def _configuration_error(lines: list[str]) -> str:
    """One line for one error (what a restart loop's log shows best), else one line per error."""
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


def check_jobs_db(target: Path | str) -> None:
    """Fail at start-up, naming JOBS_DB, when the job store cannot be used.

    A PostgreSQL URL: connect, refuse a schema newer than this code, migrate (the message shows the URL with
    its password hidden, and why). A file path: see `_check_jobs_file`.
    """
    from app.jobs.store.postgres import StoreStartError, is_postgres_url, prepare
    from app.jobs.store.sqlite import SchemaTooNew, check_schema

    if isinstance(target, str) and is_postgres_url(target):
        try:
            prepare(target)
        except StoreStartError as exc:
            raise SettingsError(_configuration_error([str(exc)])) from None
        return
    path = Path(target)
    _check_jobs_file(path)
    try:
        check_schema(path.absolute())
    except SchemaTooNew as exc:
        raise SettingsError(_configuration_error([str(exc)])) from None


def _check_jobs_file(path: Path) -> None:
    """Fail at start-up, naming JOBS_DB, when the job store could not be written.

    The store creates its file on the first submitted job (`app/jobs/store.py`), so an
    unwritable place would otherwise only show as a 500 on that job, or as a crash on the
    `<JOBS_DB>.lock` file in a container running as a user that cannot write its working
    directory. The directory is created when missing; the database file itself is not.
    """
    path = path.absolute()
    if path.is_dir():
        raise SettingsError(_configuration_error([f"JOBS_DB: {path} is a directory, not a file"]))
    try:
        _check_writable(path)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        raise SettingsError(
            _configuration_error(
                [
                    f"JOBS_DB: cannot write the job store at {path} ({reason}); set JOBS_DB to a file in a "
                    "writable directory (the Docker image uses /data/jobs.db on a volume)"
                ]
            )
        ) from None


def _check_writable(path: Path) -> None:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{directory} is not a directory") from None
    for existing in (path, Path(f"{path}.lock")):
        if existing.exists() and not os.access(existing, os.R_OK | os.W_OK):
            raise PermissionError(f"{existing} is not readable and writable by uid {os.getuid()}")
    # os.access misses read-only mounts and ACLs: create (and remove) a real file.
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".jobs-db-probe-")
    except OSError as exc:
        raise PermissionError(f"directory {directory} is not writable by uid {os.getuid()}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()

# syntax=docker/dockerfile:1.7
#
# LightOnOCR Service image.
#
#   docker build -t lightonocr-service .
#   docker run --gpus all -p 8000:8000 -v lightonocr-models:/models -v lightonocr-data:/data lightonocr-service
#
# The locked dependencies include torch from PyPI, i.e. the CUDA build with its NVIDIA
# runtime wheels (several GB): the image is meant for GPU hosts. It runs either engine:
# MODEL_SOURCE=huggingface (default, weights cached in the /models volume) or
# MODEL_SOURCE=vllm with VLLM_BASE_URL pointing at a vLLM server (see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# uv, pinned; only its binary is used, at build time.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy
WORKDIR /app

# ---------------------------------------------------------------------------------------
# Third-party dependencies only, from the lock file. This layer (the big one) is rebuilt
# only when pyproject.toml or uv.lock change.
FROM base AS deps

COPY --from=uv /uv /usr/local/bin/uv
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    UV_COMPILE_BYTECODE=1 uv sync --frozen --no-install-project --no-dev

# ---------------------------------------------------------------------------------------
FROM base AS runtime

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
    && mkdir -p /models /data \
    && chown app:app /models /data

# The virtual environment, unchanged while the lock file is unchanged (cached layer).
COPY --from=deps /app/.venv /app/.venv

# The project itself, installed (editable, a few KB) into that environment. uv is mounted
# for this step only and does not stay in the image.
COPY pyproject.toml uv.lock README.md ./
COPY app ./app
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev

# JOBS_DB: the service runs as uid 10001 and cannot write /app; jobs live on the /data volume
# (a fresh named volume takes this directory's owner, so uid 10001 can write it).
# MALLOC_MMAP_THRESHOLD_: page images (~5 MB each) go straight to mmap and back to the OS when freed;
# with glibc's default, RSS on long PDFs grew with the page count (docs/benchmarks.md).
ENV PATH="/app/.venv/bin:${PATH}" \
    MODEL_CACHE_DIR=/models \
    JOBS_DB=/data/jobs.db \
    MALLOC_MMAP_THRESHOLD_=1048576

USER 10001:10001
VOLUME ["/models", "/data"]
EXPOSE 8000

# /health is liveness: it answers while the model is still loading (/ready says when it can serve).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# On SIGTERM uvicorn stops accepting and lets in-flight requests finish for up to 30 s
# (compose gives the container 40 s before SIGKILL).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]

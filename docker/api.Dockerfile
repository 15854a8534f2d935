# The HTTP API: FastAPI under uvicorn, no torch (the project without its `worker` extra).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t lookalike-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin lookalike

WORKDIR /opt/lookalike
COPY pyproject.toml README.md ./
COPY api/ api/
COPY shared/ shared/
# The worker package is plain Python and importable here; torch, which it needs, is not.
COPY worker/ worker/
COPY lookalike/ lookalike/
RUN pip install --no-cache-dir .

USER 10001:10001
EXPOSE 8000
CMD ["lookalike", "api", "--host", "0.0.0.0", "--port", "8000"]

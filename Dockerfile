# syntax=docker/dockerfile:1
# logitwatch images. Target `service` (what docker-compose.yml runs): the server only, as a
# non-root user. Target `demo`: adds the agent and CPU torch to train a demo run against it.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin logitwatch
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY logitwatch ./logitwatch
COPY agent ./agent
COPY service ./service

FROM base AS service
RUN pip install ".[service]"
USER logitwatch
WORKDIR /home/logitwatch
# Listen on every interface inside the container; the SQLite default lands in the home
# directory when no LOGITWATCH_DB_URL is given.
ENV LOGITWATCH_HOST=0.0.0.0 \
    LOGITWATCH_PORT=8000 \
    LOGITWATCH_HOME=/home/logitwatch
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOGITWATCH_PORT', '8000'), timeout=4)"]
CMD ["logitwatch", "serve"]

FROM base AS demo
# The CPU build of torch first: PyPI's default Linux wheel brings gigabytes of CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install ".[agent,plot]"
USER logitwatch
WORKDIR /home/logitwatch
CMD ["logitwatch", "demo", "--server", "http://logitwatch:8000"]

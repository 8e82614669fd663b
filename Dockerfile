# syntax=docker/dockerfile:1
# sitegen-worker: one replica per container; scale with more containers (see docker-compose.yml).
#   docker build -t sitegen-worker .
#   docker run -e DATABASE_URL=postgresql://... -e REDIS_URL=redis://... sitegen-worker
# Every setting comes from the environment: SITEGEN_<SECTION>__<KEY>, DATABASE_URL, REDIS_URL,
# and the API key variables the providers name (docs/settings.md).

# ---- build: install the project into a venv (every dependency has wheels; slim has no compiler), then
# compile its bytecode once: the runtime user cannot write it, so without it every process start (each
# `arq --check` healthcheck included) compiles its imports from source (measured: 1.85 against 0.88 s
# of CPU per check; docs/runbook.md). unchecked-hash: an image's files never change, so the .pyc are not
# checked against the sources' times.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

# ---- runtime: the venv, the migrations, the settings file and the example brief; no compiler, no pip in the
# venv, not root
FROM python:3.11-slim
RUN groupadd --gid 10001 sitegen \
    && useradd --create-home --uid 10001 --gid 10001 sitegen \
    && mkdir -p /app/generated_sites \
    && chown 10001:10001 /app/generated_sites
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY migrations ./migrations
COPY settings.toml ./settings.toml
COPY examples ./examples
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SITEGEN_SETTINGS=/app/settings.toml \
    SITEGEN_DATABASE__MIGRATIONS_DIR=/app/migrations \
    SITEGEN_OUTPUT__DIR=/app/generated_sites
# Numeric, so a runtime's runAsNonRoot check can verify it without the image's /etc/passwd.
USER 10001:10001
# Exit 0 only while THIS container's replica refreshes its health key (the replica id defaults
# to the host name, which is the container id: every replica has its own key).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["arq", "worker.main.WorkerSettings", "--check"]
# SIGTERM: stop taking jobs, finish the current phase within worker.shutdown_grace_s, hand back the rest.
STOPSIGNAL SIGTERM
CMD ["arq", "worker.main.WorkerSettings"]

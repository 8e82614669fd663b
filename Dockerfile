# sitegen-worker: one replica per container; scale with more containers.
#   docker build -t sitegen-worker .
#   docker run -e DATABASE_URL=... -e REDIS_URL=... sitegen-worker
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 sitegen
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY migrations ./migrations
COPY settings.toml ./settings.toml
RUN mkdir -p /app/generated_sites && chown sitegen /app/generated_sites
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SITEGEN_DATABASE__MIGRATIONS_DIR=/app/migrations \
    SITEGEN_OUTPUT__DIR=/app/generated_sites
USER sitegen
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["arq", "worker.main.WorkerSettings", "--check"]
CMD ["arq", "worker.main.WorkerSettings"]

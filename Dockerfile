# The aura-pg image: the `aura-pg` command (migrate, project, relay, import,
# ...) with the binary psycopg, the NATS and webhook sinks.
#
# The base image is pinned to an exact Python patch release on an exact
# Debian release. To pin the digest as well, replace the tag with
# python:3.11.11-slim-bookworm@sha256:<digest> (`docker buildx imagetools
# inspect python:3.11.11-slim-bookworm` prints it).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY aura_pg ./aura_pg
COPY sql ./sql
COPY migrations ./migrations
COPY projections ./projections
RUN pip install ".[binary,nats,webhook]"

# A system user without a shell or a home; by number, so that a runtime that
# requires a non-root user (Kubernetes runAsNonRoot) can check it.
RUN groupadd --system --gid 10001 aura \
    && useradd --system --uid 10001 --gid aura --no-create-home --shell /usr/sbin/nologin aura
USER 10001:10001

# The daemons' liveness: GET /health on the metrics port (AURA_PG_METRICS_PORT,
# or 9187 as in docker-compose.yml's projectors). A one-shot command (migrate,
# a tool) has no endpoint: docker-compose.yml disables the check there.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AURA_PG_METRICS_PORT', '9187'), timeout=4)"]

ENTRYPOINT ["aura-pg"]

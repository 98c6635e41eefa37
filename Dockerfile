FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY aura_pg ./aura_pg
COPY sql ./sql
COPY migrations ./migrations
COPY projections ./projections
RUN pip install --no-cache-dir ".[binary,nats]"
ENTRYPOINT ["aura-pg"]

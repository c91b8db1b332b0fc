# One image for the archiver, the dashboard and the demo: `docker run kvstate:local <command>`.
# nats-server and PostgreSQL come from their official images (docker-compose.yml).
FROM python:3.11-slim

# The kvstate wheel is the client only; the server components run from /app (README "Packaging").
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY kvstate ./kvstate
COPY archiver ./archiver
COPY dashboard ./dashboard
COPY demo ./demo
COPY templates ./templates
RUN pip install -c constraints.txt ".[archiver,dashboard,demo]" \
    && useradd --system --uid 10001 --home-dir /app kvstate

USER kvstate
ENTRYPOINT ["kvstate"]
CMD ["--help"]

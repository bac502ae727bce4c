# syntax=docker/dockerfile:1
#
# One image for the four runyard services; the command picks what runs:
#
#   docker build -t runyard:local .
#   docker run runyard:local serve gateway      # or router, sessions, worker
#   docker run runyard:local migrate            # apply the database migrations
#   docker run runyard:local health HOST:PORT   # gRPC health check (exit 0 when SERVING)
#
# Services read their configuration from RUNYARD_* environment variables (or a
# TOML file named by RUNYARD_CONFIG); see compose.yaml and deploy/k8s/.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/runyard
WORKDIR /src
# Only what the package needs (.dockerignore keeps everything else out).
COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/runyard/bin/pip install .

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/runyard /opt/runyard
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin runyard
ENV PATH=/opt/runyard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RUNYARD_GATEWAY__LISTEN=0.0.0.0:50051 \
    RUNYARD_GATEWAY__INTERNAL_LISTEN=0.0.0.0:50055 \
    RUNYARD_ROUTER__LISTEN=0.0.0.0:50052 \
    RUNYARD_SESSIONS__LISTEN=0.0.0.0:50053 \
    RUNYARD_WORKER__LISTEN=0.0.0.0:50054
USER 10001:10001
# gRPC: gateway 50051 (public API), router 50052, sessions 50053, worker 50054
# (health only), gateway internal listener 50055 (workers, status; never
# publish it); /metrics: 9101-9104 in the same order.
EXPOSE 50051 50052 50053 50054 50055 9101 9102 9103 9104
ENTRYPOINT ["runyard"]
CMD ["--help"]

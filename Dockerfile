# syntax=docker/dockerfile:1
#
# facegate container image.
#   docker build -t facegate .
#   docker run --rm -p 8000:8000 -e FACEGATE_UPSTREAM_API_KEY_FILE=/run/secrets/key ... facegate
#   docker run --rm --network none facegate keys create --tenant NAME   # key on stdout, TOML on stderr
#
# Two stages: the builder installs facegate and its pinned dependencies
# (constraints.txt, a `pip freeze` of the tested environment) into a venv; the
# runtime stage is a fresh slim image that receives only that venv. Every
# dependency ships manylinux wheels, so no compiler is installed in either stage.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, against a stub package, so that a code change does not
# re-download them (the layer below is reused while pyproject/constraints are unchanged).
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir app && touch app/__init__.py \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall --yes facegate \
    && rm -rf app build ./*.egg-info

# Then facegate itself (no dependency resolution: they are all present and pinned).
COPY app ./app
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && pip check \
    && facegate --help > /dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="facegate" \
      org.opencontainers.image.description="REST gateway in front of ailabapi's Face Analyzer Advanced API" \
      org.opencontainers.image.licenses="Proprietary"

# A fixed, unprivileged UID/GID (10001) matching the Kubernetes securityContext.
RUN groupadd --system --gid 10001 facegate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin facegate

COPY --from=builder /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: the root FS is read-only in production (pip already
# compiled the .pyc files in the builder). FACEGATE_HOST: listen on all interfaces
# inside the container. The tenants file and upstream key are mounted at run time.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FACEGATE_HOST=0.0.0.0 \
    FACEGATE_PORT=8000 \
    FACEGATE_TENANTS_FILE=/etc/facegate/tenants.toml

USER 10001:10001
WORKDIR /srv/facegate
EXPOSE 8000

# Liveness only (/healthz): no curl in slim, so python's urllib. Kubernetes ignores
# this and uses its own probes (deploy/base/deployment.yaml).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FACEGATE_PORT', '8000'), timeout=2)"]

# No tini: facegate runs as PID 1 in exec form and uvicorn installs its own SIGTERM
# and SIGINT handlers (the kernel would otherwise ignore those signals for PID 1),
# so `docker stop` / a pod deletion drains in-flight requests within
# FACEGATE_SHUTDOWN_GRACE_S. facegate starts no subprocesses except uvicorn's own
# workers (FACEGATE_WORKERS>1), which uvicorn waits for, so there are no orphans
# to reap. If you add a child-spawning wrapper, run with `docker run --init`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["facegate"]
CMD ["serve"]

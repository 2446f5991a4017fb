# syntax=docker/dockerfile:1
#
# hubgate container image: `hubgate serve` on 0.0.0.0:$HUBGATE_PORT (8080).
#
#   docker build -t hubgate .
#   docker run --rm -p 8080:8080 -e HUBGATE_JWT_HS256_SECRET=... hubgate
#
# tests/test_packaging.py reads this file and runs its COPY, `pip wheel` and `pip install` steps,
# its ENV, ENTRYPOINT and HEALTHCHECK outside Docker, so a change here is tested there.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build: the wheel
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps -w /dist .

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 hubgate \
 && useradd --system --uid 10001 --gid hubgate --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin hubgate
# The wheel is bind-mounted from the build stage, so it never becomes a layer of this image.
# Every dependency ships a manylinux wheel for CPython 3.11: no compiler is needed here.
RUN --mount=type=bind,from=build,source=/dist,target=/dist pip install --no-cache-dir /dist/*.whl
ENV HUBGATE_HOST=0.0.0.0 HUBGATE_PORT=8080
USER 10001:10001
WORKDIR /
EXPOSE 8080
# hubgate drains on SIGTERM (docs/configuration.md, HUBGATE_DRAIN_SECONDS) and exits 0; give
# `docker stop` a `--time` above the drain window (ECS: the container's stopTimeout).
STOPSIGNAL SIGTERM
# Liveness only (/readyz is the load balancer's check). The slim image has no curl; urlopen
# raises on anything but 2xx, which exits non-zero; no proxy is ever used for loopback.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:${HUBGATE_PORT:-8080}/healthz', timeout=3)"
ENTRYPOINT ["hubgate", "serve"]

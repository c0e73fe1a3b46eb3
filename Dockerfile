# syntax=docker/dockerfile:1
# infercore as a container: the locked workspace in a virtual environment, a non-root user, and
# the recipes (with their models) baked in or mounted.
#
#   docker build -t infercore .                                   # recipes baked in (default)
#   docker build -t infercore --build-arg RECIPES=mounted .       # mount them at /app/recipes
#   docker build -t infercore --build-arg EXTRAS="onnx sklearn" . # fewer plugins, smaller image
#   docker run --rm -p 127.0.0.1:8080:8080 infercore serve +recipe=iris env=prod server.host=0.0.0.0
#
# See docs/deploy.md. The host is set to 0.0.0.0 explicitly (INFERCORE_HOST, read by env=prod, and
# server.host in CMD): inside a container loopback is unreachable from outside.

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13
# baked: copy recipes/ into the image; mounted: an empty /app/recipes to mount a volume on.
ARG RECIPES=baked

FROM ${UV_IMAGE} AS uv

# --- build: resolve nothing, install exactly what uv.lock says -------------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
# First-party plugins installed next to the core (optional extras of the infercore package).
# The default runs every recipe docs/deploy.md runs in it: the fraud recipe needs onnx, feast
# and drift-stats (its `ks` and `chi2` drift detectors); iris needs onnx.
ARG EXTRAS="onnx feast sklearn drift-stats"
WORKDIR /src
# Dependencies first (a layer that changes only with uv.lock or a plugin), then the core.
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY plugins/ plugins/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable --no-install-project \
        $(for e in $EXTRAS; do printf -- '--extra %s ' "$e"; done)
COPY infercore/ infercore/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable \
        $(for e in $EXTRAS; do printf -- '--extra %s ' "$e"; done)

# --- recipes: baked in, or an empty folder to mount on ---------------------------------------
FROM scratch AS recipes-baked
COPY recipes/ /recipes/

FROM scratch AS recipes-mounted
COPY deploy/docker/recipes-mounted.txt /recipes/README.txt

FROM recipes-${RECIPES} AS recipes

# --- runtime: the virtual environment, config and recipes; no compilers, no uv ----------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} infercore \
 && useradd --system --uid ${UID} --gid infercore --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin infercore \
 && mkdir -p /var/lib/infercore \
 && chown infercore:infercore /var/lib/infercore
COPY --from=build /opt/venv /opt/venv
# Config groups and recipes belong to root: the server cannot change what it serves.
COPY conf/ /app/conf/
COPY --from=recipes /recipes/ /app/recipes/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FEAST_USAGE=False \
    INFERCORE_CONF_DIR=/app/conf \
    INFERCORE_RECIPES_DIR=/app/recipes \
    INFERCORE_HOST=0.0.0.0 \
    INFERCORE_PORT=8080
WORKDIR /app
USER infercore:infercore
EXPOSE 8080
# Liveness only (never depends on models): a container whose models still load is healthy.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "infercore.deploy.probe", "http://127.0.0.1:8080/v2/health/live"]
# infercore handles SIGTERM itself (readiness false, drain, exit 0): exec form, no shell.
STOPSIGNAL SIGTERM
ENTRYPOINT ["infercore"]
CMD ["serve", "+recipe=iris", "env=prod", "server.host=0.0.0.0"]

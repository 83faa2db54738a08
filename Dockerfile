# orangepill-bridge: one image for the bridge (`run`), the simulator (`simulate`)
# and the other sub-commands. Build context: the repository root.
# Pinned to an exact release (bump deliberately); pin by digest too where your registry policy asks for it.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs, so that edits to tests or docs do not bust the cache.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . && rm -rf /src

# Non-root user; the spool lives on a volume mounted at /var/lib/orangepill-bridge,
# created here so that a fresh named volume inherits its ownership.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/orangepill-bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/orangepill-bridge \
    && chown bridge:bridge /var/lib/orangepill-bridge
USER bridge
WORKDIR /var/lib/orangepill-bridge

# /metrics, /healthz, /readyz (BRIDGE_METRICS_ADDR).
EXPOSE 9180
# SIGTERM: unsubscribe, drain, close, exit 0 (give it time: docker stop -t / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["orangepill-bridge"]
CMD ["run"]

# Baton: `baton serve` on port 8080, its SQLite store under /data.
#
# The image runs with auth ON (the settings' default): `baton serve` refuses to
# start until a token is configured (mount a config with auth.tokens and set
# BATON_CONFIG) or auth is switched off on purpose (BATON_AUTH__ENABLED=false,
# as docker-compose.yml does for a laptop).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies pyproject.toml lists, in a layer of their own: a change to the
# code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY server ./server
COPY handlers ./handlers
COPY bench ./bench
RUN pip install --no-deps . && rm -rf build *.egg-info
# config/baton.yaml and config/workflows are read from the working directory, like a checkout
COPY config ./config

# Not root. /data is created here, owned by the user, so a fresh named volume
# mounted on it starts with that owner.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin baton \
    && mkdir /data && chown baton /data
USER baton

# Inside a container loopback is unreachable from outside: bind every interface
# (publish the port on the host's loopback, or put a proxy with TLS in front).
ENV BATON_HOST=0.0.0.0 \
    BATON_PORT=8080 \
    BATON_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080

# Liveness: the process serves (docker-compose.yml checks readiness, /readyz, instead).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['BATON_PORT']}/healthz\", timeout=2)"]

CMD ["baton", "serve"]

# syntax=docker/dockerfile:1
# shardvault's images, one build for docker-compose.yml:
#
#   wheel     builds the shardvault wheel once (the package-dir mapping of pyproject.toml)
#   postgres  PostgreSQL 15 with shardvault installed, so archive_command can run
#             `shardvault wal-push %p` as the server's own `postgres` user (uid 999)
#   app       (the default, last stage) python:3.11-slim with shardvault and the
#             PostgreSQL 15 programs: pg_basebackup/pg_dump for backups, initdb/pg_ctl
#             for the scratch cluster of a PostgreSQL drill; runs as the non-root
#             user `shardvault`
#
# Both runtime stages run shardvault as uid/gid 999 on purpose: the worker, the
# exporter and PostgreSQL's archive_command share one state volume (the SQLite
# state the exporter reads), and the postgres image's `postgres` user is 999.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG POSTGRES_IMAGE=postgres:15-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
# Only what the build needs (see .dockerignore): the layout's code folders and the metadata.
COPY pyproject.toml README.md ./
COPY shardvault ./shardvault
COPY shards ./shards
COPY verify ./verify
COPY restore ./restore
COPY flows ./flows
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# PostgreSQL with WAL archiving to shardvault.  Debian bookworm's python3 is 3.11,
# the version the project requires; the venv lives outside any home directory and
# is world-readable, so the `postgres` user can run it.
FROM ${POSTGRES_IMAGE} AS postgres
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m venv /opt/shardvault \
    && /opt/shardvault/bin/pip install --no-cache-dir /tmp/wheels/*.whl \
    && ln -s /opt/shardvault/bin/shardvault /usr/local/bin/shardvault \
    && rm -rf /tmp/wheels \
    && mkdir -p /var/lib/shardvault/state \
    && chown -R postgres:postgres /var/lib/shardvault
ENV SHARDVAULT_CONFIG=/etc/shardvault/shardvault.toml

FROM ${PYTHON_IMAGE} AS app
# postgresql (15 on bookworm, the server's major version): pg_basebackup, pg_dump and
# pg_restore for backups, initdb/pg_ctl/postgres for drills' scratch clusters.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
RUN groupadd --system --gid 999 shardvault \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/shardvault --create-home --shell /usr/sbin/nologin shardvault \
    && mkdir -p /var/lib/shardvault/state /var/lib/shardvault/prefect /var/lib/shardvault/drills \
    && chown -R shardvault:shardvault /var/lib/shardvault
ENV SHARDVAULT_CONFIG=/etc/shardvault/shardvault.toml \
    PREFECT_HOME=/var/lib/shardvault/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TMPDIR=/var/lib/shardvault/drills
USER shardvault
WORKDIR /var/lib/shardvault
EXPOSE 9477
CMD ["shardvault", "--help"]

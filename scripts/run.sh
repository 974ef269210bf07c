#!/usr/bin/env bash
# `make run`: the main job on the embedded default, all on loopback, no containers.
#
# Under ./run (or $RUN_DIR): a 4-of-6 repository on six local-directory peers
# in three zones and three sources: "docs" (a copy of /usr/include), "db" (a
# local PostgreSQL 15 cluster under pg/, run as the `postgres` user, its WAL
# archived by `shardvault wal-push`, with a table `orders`) and "assets" (a
# bucket `assets` on a moto S3 server).  Then a local Prefect server with its
# own PREFECT_HOME, `shardvault serve` (every deployment of the config, on its
# cron schedule, and a drill/<playbook> per dr_playbooks/*.yaml), the
# exporter, Prometheus with the shipped rules and, when it is installed,
# Alertmanager with the shipped routes.  It backs up db (a full, then an
# incremental point) and assets, triggers a first backup of docs through
# Prefect (the exporter starts once there is a state to export), runs every
# shipped DR playbook through Prefect, prints each result and the URLs and
# waits.  Ctrl-C (or SIGTERM) stops everything in reverse order: serve before
# the server (a serve() left behind hangs pausing its deployments), the S3
# server and PostgreSQL last.
#
# PostgreSQL's archive_command runs as `postgres`, so this needs root (runuser):
# the peers and the state belong to the group `postgres` (setgid directories,
# umask 002), the password file is readable by that group, and `postgres` may
# traverse down to the run directory and the venv.
#
# Ports (all on 127.0.0.1): $RUN_PREFECT_PORT (4200), $RUN_EXPORTER_PORT
# (9477), $RUN_PROMETHEUS_PORT (9090), $RUN_ALERTMANAGER_PORT (9093),
# $RUN_PG_PORT (5433), $RUN_S3_PORT (9000).  shardvault.toml is written on
# every run (the ports may change); the repository, the cluster and the copy
# of docs are kept.  RUN_EXIT_WHEN_READY=1 stops everything right after the
# first backups and drills.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
RUN="$(mkdir -p "${RUN_DIR:-$HERE/run}" && cd "${RUN_DIR:-$HERE/run}" && pwd)"
BIN="${BIN:-$HERE/.venv/bin}"
PREFECT_PORT="${RUN_PREFECT_PORT:-4200}"
EXPORTER_PORT="${RUN_EXPORTER_PORT:-9477}"
PROMETHEUS_PORT="${RUN_PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${RUN_ALERTMANAGER_PORT:-9093}"
PG_PORT="${RUN_PG_PORT:-5433}"
S3_PORT="${RUN_S3_PORT:-9000}"
S3_URL="http://127.0.0.1:$S3_PORT"
PG="$RUN/pg"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
CONFIG="$RUN/shardvault.toml"
PASSWORD_FILE="$RUN/password"
SV=("$BIN/shardvault" --config "$CONFIG" --password-file "$PASSWORD_FILE")
export PREFECT_HOME="$RUN/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export SHARDVAULT_CONFIG="$CONFIG"
# moto takes any credentials; serve's scheduled backups of "assets" inherit them.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-shardvault-run}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-shardvault-run}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
pids=()
names=()
stoppers=()  # how to stop a daemon the script did not fork itself ("" for its own children: SIGTERM)
start() {  # start NAME LOGFILE COMMAND...: in the background, remembered for the ordered stop
  local name=$1 log=$2
  shift 2
  "$@" >"$log" 2>&1 &
  pids+=($!)
  names+=("$name")
  stoppers+=("")
}
stop_all() {
  trap - INT TERM EXIT
  say "Stopping (serve before the Prefect server, PostgreSQL last)"
  # Started in the order postgres, s3, server, serve, exporter, alertmanager,
  # prometheus: stopped in reverse, so serve goes before the server it talks to.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    if [ -n "${stoppers[$i]}" ]; then
      eval "${stoppers[$i]}" || true
      echo "stopped ${names[$i]}"
      continue
    fi
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
    echo "stopped ${names[$i]}"
  done
}
trap 'stop_all; exit 130' INT TERM
trap 'stop_all' EXIT

wait_http() {  # wait_http URL SECONDS
  local url=$1 deadline=$((SECONDS + $2))
  until "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $url" >&2; return 1; }
    sleep 0.5
  done
}
as_postgres() { runuser -u postgres -- "$@"; }
psql() { "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

# --- What PostgreSQL's archive_command (run as `postgres`) needs -----------------------------
[ "$(id -u)" -eq 0 ] || { echo "make run needs root: PostgreSQL runs as the postgres user (runuser)" >&2; exit 1; }
"$HERE/scripts/apt-install" "postgresql:$PGBIN/initdb"
for dir in "$RUN" "$HERE" "$BIN"; do  # a checkout (or run dir) under a mode-700 home
  while [ "$dir" != / ]; do
    if [ "$(( 0$(stat -c %a "$dir") & 1 ))" -eq 0 ]; then
      chmod o+x "$dir" && echo "chmod o+x $dir (the postgres user must reach the venv and the repository)"
    fi
    dir="$(dirname "$dir")"
  done
done
if ! as_postgres "$BIN/python" -P -c 'import shardvault.backup.wal'; then
  echo "the postgres user cannot run $BIN/python: make the venv from /usr/bin/python3.11, world-readable" >&2
  exit 1
fi
umask 002  # in the setgid directories of group postgres below, what root writes postgres can write too

say "Repository on six local-directory peers under $RUN"
mkdir -p "$RUN/peers" "$RUN/state" "$RUN/logs"
[ -f "$PASSWORD_FILE" ] || (umask 077 && head -c 24 /dev/urandom | base64 > "$PASSWORD_FILE")
chgrp postgres "$PASSWORD_FILE" && chmod 640 "$PASSWORD_FILE"  # root and archive_command only
if [ ! -d "$RUN/docs" ]; then cp -r /usr/include "$RUN/docs"; fi
{
  printf '# Written by scripts/run.sh on every run.\n'
  printf '[repository]\nk = 4\nn = 6\nstate_dir = "state"\n\n'
  printf '[schedule]\ntimezone = "UTC"\ncheck = "*/30 * * * *"\nscrub = "15 3 * * *"\n\n'
  for i in 0 1 2 3 4 5; do
    printf '[[peers]]\nname = "p%d"\nurl = "peers/p%d"\nzone = "z%d"\n\n' "$i" "$i" $((i / 2 + 1))
  done
  printf '[[sources]]\nname = "docs"\ntype = "files"\npath = "docs"\nrpo_objective_seconds = 3600\n'
  printf 'backup_interval_seconds = 3600\n\n[sources.schedule]\nincremental = "0 * * * *"\nfull = "0 3 * * 0"\n\n'
  printf '[[sources]]\nname = "db"\ntype = "postgres"\nbin_dir = "%s"\n' "$PGBIN"
  printf 'dsn = "host=127.0.0.1 port=%s user=postgres dbname=postgres"\n' "$PG_PORT"
  printf 'rpo_objective_seconds = 3600\nbackup_interval_seconds = 3600\n\n'
  printf '[sources.schedule]\nincremental = "*/15 * * * *"\nfull = "30 3 * * 0"\n\n'
  printf '[[sources]]\nname = "assets"\ntype = "bucket"\nendpoint = "%s"\nbucket = "assets"\n' "$S3_URL"
  printf 'region = "us-east-1"\nrpo_objective_seconds = 86400\nbackup_interval_seconds = 86400\n\n'
  printf '[sources.schedule]\nincremental = "45 2 * * *"\n'
} > "$CONFIG"
chmod 644 "$CONFIG"
if [ ! -d "$RUN/peers/p0" ]; then
  "${SV[@]}" init
fi
chgrp -R postgres "$RUN/peers" "$RUN/state"
chmod -R g+rwX "$RUN/peers" "$RUN/state"
find "$RUN/peers" "$RUN/state" -type d -exec chmod g+s {} +

say "PostgreSQL 15 on 127.0.0.1:$PG_PORT ($PG), its WAL archived by shardvault wal-push"
if [ ! -f "$PG/data/PG_VERSION" ]; then
  mkdir -p "$PG" && chown postgres:postgres "$PG" && chmod 700 "$PG"
  as_postgres "$PGBIN/initdb" -D "$PG/data" -U postgres -A trust -E UTF8 --no-locale >"$RUN/logs/initdb.log"
  echo "include_if_exists = 'shardvault-run.conf'" | as_postgres tee -a "$PG/data/postgresql.conf" >/dev/null
fi
if as_postgres "$PGBIN/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then  # left running by a killed run
  as_postgres "$PGBIN/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null
fi
# Written on every run: the port and the paths may have changed.
as_postgres tee "$PG/data/shardvault-run.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG'
wal_level = replica
archive_mode = on
archive_command = '"$BIN/shardvault" --config "$CONFIG" --password-file "$PASSWORD_FILE" wal-push %p'
max_wal_senders = 4
CONF
as_postgres "$PGBIN/pg_ctl" -D "$PG/data" -l "$PG/log" -w -t 60 start >/dev/null
pids+=("$(as_postgres head -1 "$PG/data/postmaster.pid")")
names+=(postgres)
stoppers+=("as_postgres '$PGBIN/pg_ctl' -D '$PG/data' -m fast -w -t 60 stop >/dev/null")
psql -c "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, amount int NOT NULL, at timestamptz DEFAULT now())"
if [ "$(psql -c 'SELECT count(*) FROM orders')" -lt 1000 ]; then
  psql -c "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 1000) g"
fi
if ! "${SV[@]}" snapshots --source db --json | grep -q '"id"'; then
  say "First full backup of db (a base backup; the WAL follows by archive_command)"
  timeout 600 "${SV[@]}" backup db --full
fi
psql -c "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 100) g"  # only in the WAL
say "Incremental backup of db: the WAL up to now ($(psql -c 'SELECT count(*) FROM orders') orders)"
timeout 600 "${SV[@]}" backup db

say "S3 server (moto) on $S3_URL with a bucket assets"
start s3 "$RUN/logs/s3.log" "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_http "$S3_URL/moto-api/" 30
"$BIN/python" - "$S3_URL" <<'PY'
import sys

import boto3
from botocore.config import Config

s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
if "assets" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket="assets")
for i in range(12):  # the same objects on every run (moto keeps nothing), so deduplicated
    s3.put_object(Bucket="assets", Key=f"img/{i:02d}.bin", Body=bytes([i]) * (1000 * (i + 1)))
s3.put_object(Bucket="assets", Key="index.html", Body=b"<html>assets</html>\n", ContentType="text/html")
PY
say "Backup of assets"
"${SV[@]}" backup assets

say "Prefect server on 127.0.0.1:$PREFECT_PORT (PREFECT_HOME=$PREFECT_HOME)"
start prefect-server "$RUN/logs/prefect-server.log" \
  "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" 120

say "shardvault serve: every deployment of the config, a drill per playbook"
start serve "$RUN/logs/serve.log" "${SV[@]}" serve --playbooks "$HERE/dr_playbooks"

say "First backup, run by Prefect (backup/docs)"
for _ in $(seq 1 120); do
  "$BIN/prefect" deployment inspect backup/docs >/dev/null 2>&1 && break
  sleep 0.5
done
"$BIN/prefect" deployment run backup/docs --watch

say "Exporter on 127.0.0.1:$EXPORTER_PORT"
start exporter "$RUN/logs/exporter.log" \
  "$BIN/shardvault" --config "$CONFIG" exporter --listen "127.0.0.1:$EXPORTER_PORT"
wait_http "http://127.0.0.1:$EXPORTER_PORT/metrics" 30

AM_URL=""
if command -v prometheus-alertmanager >/dev/null && [ -f "$HERE/monitoring/alertmanager/alertmanager.yml" ]; then
  say "Alertmanager on 127.0.0.1:$ALERTMANAGER_PORT (receivers are placeholders until you fill them)"
  mkdir -p "$RUN/alertmanager"
  start alertmanager "$RUN/logs/alertmanager.log" prometheus-alertmanager \
    --config.file="$HERE/monitoring/alertmanager/alertmanager.yml" --storage.path="$RUN/alertmanager" \
    --web.listen-address="127.0.0.1:$ALERTMANAGER_PORT" --cluster.listen-address=
  AM_URL="http://127.0.0.1:$ALERTMANAGER_PORT"
fi

if command -v prometheus >/dev/null; then
  say "Prometheus on 127.0.0.1:$PROMETHEUS_PORT with the shipped rules"
  {
    printf 'global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n'
    printf 'rule_files:\n  - %s\n' "$HERE/monitoring/prometheus/shardvault-rules.yml"
    printf 'scrape_configs:\n  - job_name: shardvault\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' \
      "$EXPORTER_PORT"
    if [ -n "$AM_URL" ]; then
      printf 'alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ["127.0.0.1:%s"]\n' \
        "$ALERTMANAGER_PORT"
    fi
  } > "$RUN/prometheus.yml"
  mkdir -p "$RUN/prometheus"
  start prometheus "$RUN/logs/prometheus.log" prometheus --config.file="$RUN/prometheus.yml" \
    --storage.tsdb.path="$RUN/prometheus" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
fi

say "DR drills: every playbook in dr_playbooks/"
results=()
for playbook in "$HERE"/dr_playbooks/*.yaml; do
  name="$(basename "$playbook" .yaml)"
  say "DR drill $name"
  if "$BIN/prefect" deployment inspect "drill/$name" >/dev/null 2>&1; then
    "$BIN/prefect" deployment run "drill/$name" --watch || true
  else
    "${SV[@]}" drill "$playbook" || true
  fi
  # The drill's own report (state/drills/NAME-TIME.json) says whether it passed.
  report="$(ls -t "$RUN"/state/drills/"$name"-*.json 2>/dev/null | head -1 || true)"
  result="no report"
  if [ -n "$report" ]; then
    result="$("$BIN/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["result"])' "$report")"
  fi
  results+=("$(printf 'drill %-15s %-9s %s' "$name:" "$result" "${report:+${report%.json}.md}")")
done

say "Ready"
echo "Prefect UI:       http://127.0.0.1:$PREFECT_PORT/"
echo "metrics:          http://127.0.0.1:$EXPORTER_PORT/metrics"
command -v prometheus >/dev/null && echo "Prometheus:       http://127.0.0.1:$PROMETHEUS_PORT/alerts"
[ -n "$AM_URL" ] && echo "Alertmanager:     $AM_URL/"
echo "PostgreSQL:       host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres (source db)"
echo "S3 (moto):        $S3_URL bucket assets (source assets)"
printf '%s\n' "${results[@]}"
echo "logs:             $RUN/logs/"
if [ "${RUN_EXIT_WHEN_READY:-0}" = 1 ]; then
  exit 0
fi
echo "Ctrl-C stops everything."
wait

#!/usr/bin/env bash
# `make run`: the main job on the embedded default, all on loopback, no containers.
#
# Under ./run (or $RUN_DIR): a 4-of-6 repository on six local-directory peers
# in three zones, a source "docs" (a copy of /usr/include), a local Prefect
# server with its own PREFECT_HOME, `shardvault serve` (every deployment of
# the config, on its cron schedule), the exporter, Prometheus with the shipped
# rules and, when it is installed, Alertmanager with the shipped routes.  It
# triggers a first backup through Prefect (the exporter starts once there is
# a state to export), then a DR drill, prints the URLs and waits.  Ctrl-C (or SIGTERM) stops everything in the right order: serve
# before the server (a serve() left behind hangs pausing its deployments).
#
# Ports: $RUN_PREFECT_PORT (4200), $RUN_EXPORTER_PORT (9477),
# $RUN_PROMETHEUS_PORT (9090), $RUN_ALERTMANAGER_PORT (9093).
# RUN_EXIT_WHEN_READY=1 stops everything right after the first backup and
# drill (the test suite uses it).
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
RUN="$(mkdir -p "${RUN_DIR:-$HERE/run}" && cd "${RUN_DIR:-$HERE/run}" && pwd)"
BIN="${BIN:-$HERE/.venv/bin}"
PREFECT_PORT="${RUN_PREFECT_PORT:-4200}"
EXPORTER_PORT="${RUN_EXPORTER_PORT:-9477}"
PROMETHEUS_PORT="${RUN_PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${RUN_ALERTMANAGER_PORT:-9093}"
CONFIG="$RUN/shardvault.toml"
PASSWORD_FILE="$RUN/password"
export PREFECT_HOME="$RUN/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export SHARDVAULT_CONFIG="$CONFIG"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
pids=()
names=()
start() {  # start NAME LOGFILE COMMAND...: in the background, remembered for the ordered stop
  local name=$1 log=$2
  shift 2
  "$@" >"$log" 2>&1 &
  pids+=($!)
  names+=("$name")
}
stop_all() {
  trap - INT TERM EXIT
  say "Stopping (serve first, the Prefect server last)"
  # Started in the order server, serve, exporter, alertmanager, prometheus:
  # stopped in reverse, so serve goes before the server it talks to.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
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

say "Repository on six local-directory peers under $RUN"
mkdir -p "$RUN/peers" "$RUN/logs"
[ -f "$PASSWORD_FILE" ] || (umask 077 && head -c 24 /dev/urandom | base64 > "$PASSWORD_FILE")
if [ ! -d "$RUN/docs" ]; then cp -r /usr/include "$RUN/docs"; fi
if [ ! -f "$CONFIG" ]; then
  {
    printf '[repository]\nk = 4\nn = 6\nstate_dir = "state"\n\n'
    printf '[schedule]\ntimezone = "UTC"\ncheck = "*/30 * * * *"\nscrub = "15 3 * * *"\n\n'
    for i in 0 1 2 3 4 5; do
      printf '[[peers]]\nname = "p%d"\nurl = "peers/p%d"\nzone = "z%d"\n\n' "$i" "$i" $((i / 2 + 1))
    done
    printf '[[sources]]\nname = "docs"\ntype = "files"\npath = "docs"\nrpo_objective_seconds = 3600\n'
    printf 'backup_interval_seconds = 3600\n\n[sources.schedule]\nincremental = "0 * * * *"\nfull = "0 3 * * 0"\n'
  } > "$CONFIG"
fi
if [ ! -d "$RUN/peers/p0" ]; then
  "$BIN/shardvault" --config "$CONFIG" --password-file "$PASSWORD_FILE" init
fi

say "Prefect server on 127.0.0.1:$PREFECT_PORT (PREFECT_HOME=$PREFECT_HOME)"
start prefect-server "$RUN/logs/prefect-server.log" \
  "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" 120

say "shardvault serve: every deployment of the config"
start serve "$RUN/logs/serve.log" \
  "$BIN/shardvault" --config "$CONFIG" --password-file "$PASSWORD_FILE" serve

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

say "DR drill (dr_playbooks/docs-restore.yaml)"
if "$BIN/prefect" deployment inspect drill/docs-restore >/dev/null 2>&1; then
  "$BIN/prefect" deployment run drill/docs-restore --watch || true
else
  "$BIN/shardvault" --config "$CONFIG" --password-file "$PASSWORD_FILE" drill "$HERE/dr_playbooks/docs-restore.yaml" || true
fi
REPORT="$(ls -t "$RUN"/state/drills/*.md 2>/dev/null | head -1 || true)"

say "Ready"
echo "Prefect UI:       http://127.0.0.1:$PREFECT_PORT/"
echo "metrics:          http://127.0.0.1:$EXPORTER_PORT/metrics"
command -v prometheus >/dev/null && echo "Prometheus:       http://127.0.0.1:$PROMETHEUS_PORT/alerts"
[ -n "$AM_URL" ] && echo "Alertmanager:     $AM_URL/"
echo "drill report:     ${REPORT:-(none yet)}"
echo "logs:             $RUN/logs/"
if [ "${RUN_EXIT_WHEN_READY:-0}" = 1 ]; then
  exit 0
fi
echo "Ctrl-C stops everything."
wait

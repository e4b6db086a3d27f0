#!/usr/bin/env bash
# Measurement for BENCHMARKS.md (not a test): issue 4's recycling run on the model stand-in of
# ../shared/bench/apps.py (300 MiB of weights at import, BLAS per request; needs numpy in PYTHON),
# preload, 4 workers, 50 connections. Compare `recycle-model.sh 0 60` with `recycle-model.sh 50 60`.
# usage: tests/bench/recycle-model.sh MAX_REQUESTS SECONDS   (EXTRA= adds lines to [workers])
set -u
mr=${1:?max_requests} dur=${2:-60}
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${GTE_BIN:-$here/target/release/gte-supervisor}
apps=${BENCH_APPS:-$here/../shared/bench}
python=${PYTHON:-/opt/peers/bin/python}
port=${PORT:-18550}
work=$(mktemp -d /tmp/gte-recycle-model.XXXXXX)
cat >"$work/workers.toml" <<TOML
bind = "127.0.0.1:$port"
pidfile = "$work/gte.pid"
[app]
wsgi = "apps:model_preloaded"
chdir = "$apps"
python = "$python"
preload = true
env = { MODEL_PRELOAD = "1" }
[workers]
count = 4
timeout = 30
max_requests = $mr
max_requests_jitter = $((mr / 5))
${EXTRA:-}
[log]
level = "info"
access = "off"
error = "$work/error.log"
TOML
"$bin" -c "$work/workers.toml" & pid=$!
for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$port/-/ready" >/dev/null && break; sleep 0.1; done
wrk -t1 -c50 -d3s "http://127.0.0.1:$port/?warm" >/dev/null
s0=$(grep -c 'worker spawned' "$work/error.log")
wrk -t1 -c50 -d"${dur}s" --latency --timeout 10s "http://127.0.0.1:$port/?text=hello" >"$work/wrk.txt"
s1=$(grep -c 'worker spawned' "$work/error.log")
kill -TERM "$pid"; wait "$pid"
echo "model max_requests=$mr ${dur}s: $(grep -E 'Requests/sec' "$work/wrk.txt" | tr -s ' ')" \
  "p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")" \
  "requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")" \
  "non2xx=$(awk -F': *' '/Non-2xx/ {n = $2} END {print n + 0}' "$work/wrk.txt")" \
  "socket_errors=[$(grep 'Socket errors' "$work/wrk.txt" || echo none)]" \
  "workers_started=$((s1 - s0)) logs=$work"

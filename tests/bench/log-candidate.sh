#!/usr/bin/env bash
# gte-log-cand.sh PORT WORKERS MODULE:CALLABLE CHDIR PYTHON — like shared/bench/gte-candidate.sh,
# plus [log] and metrics knobs: ACCESS=file|off (default file), ACCESS_FORMAT (default built-in),
# METRICS=1 (listener on PORT+1000), GTE_EXTRA_WORKERS (lines added to [workers]), GTE_EXTRA_TOP
# (top-level lines, e.g. "master_threads = 2").
set -eu
port=$1 workers=$2 app=$3 chdir=$4 python=$5
bin=${GTE_BIN:?GTE_BIN must point at the gte-supervisor binary}
dir=$(mktemp -d /tmp/bar-cand.XXXXXX)
access="$dir/access.log"
[ "${ACCESS:-file}" = off ] && access=off
metrics=""
[ "${METRICS:-0}" = 1 ] && metrics="metrics = \"127.0.0.1:$((port + 1000))\""
fmt=""
[ -n "${ACCESS_FORMAT:-}" ] && fmt="access_format = '${ACCESS_FORMAT}'"
cat >"$dir/workers.toml" <<TOML
bind = "127.0.0.1:$port"
pidfile = "$dir/gte.pid"
$metrics
${GTE_EXTRA_TOP:-}
[app]
wsgi = "$app"
chdir = "$chdir"
python = "$python"
[workers]
count = $workers
timeout = 30
${GTE_EXTRA_WORKERS:-}
[log]
level = "warning"
access = "$access"
error = "$dir/error.log"
$fmt
TOML
exec "$bin" -c "$dir/workers.toml"

#!/usr/bin/env bash
# Measurements for BENCHMARKS.md (not a test): recycling under load, HUP and USR2 under load,
# timeout latency. Needs wrk and python3; uses ../shared/bench/apps.py (hello).
# usage: tests/bench/lifecycle.sh [SECONDS]   (default 30)
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${GTE_BIN:-$here/target/release/gte-supervisor}
apps=${BENCH_APPS:-$here/../shared/bench}
dur=${1:-30}
work=$(mktemp -d /tmp/gte-lifecycle.XXXXXX)
port=18400

conf() { # $1 = extra [workers] lines
  cat >"$work/workers.toml" <<TOML
bind = "127.0.0.1:$port"
pidfile = "$work/gte.pid"
[app]
wsgi = "apps:hello"
chdir = "$apps"
python = "python3"
${PRELOAD:+preload = true}
[workers]
count = 4
timeout = 1
$1
[log]
level = "info"
access = "off"
error = "$work/error.log"
TOML
}

start() {
  "$bin" -c "$work/workers.toml" & pid=$!
  for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$port/-/ready" >/dev/null && return 0; sleep 0.05; done
  echo "did not start"; kill "$pid"; exit 1
}
stop() { kill -TERM "$(cat "$work/gte.pid" 2>/dev/null || echo "$pid")" 2>/dev/null; wait "$pid" 2>/dev/null; sleep 0.5; }
summary() { # wrk output file
  awk '/Requests\/sec/ {r=$2} /Non-2xx/ {n=$NF} /Socket errors/ {e=$0} /requests in/ {t=$1}
       END {printf "requests=%s rps=%s non2xx=%s errors=[%s]\n", t, r, (n==""?0:n), (e==""?"none":e)}' "$1"
}

echo "## recycling: 4 workers, 50 connections, ${dur}s"
conf "max_requests = 0"; start
wrk -t1 -c50 -d"${dur}s" "http://127.0.0.1:$port/" >"$work/off.txt"; stop
echo "recycling off: $(summary "$work/off.txt")"
conf "max_requests = 50
max_requests_jitter = 10"; : >"$work/error.log"; start
wrk -t1 -c50 -d"${dur}s" "http://127.0.0.1:$port/" >"$work/on.txt"; stop
echo "max_requests=50: $(summary "$work/on.txt") recycles=$(grep -c 'reason="max_requests"' "$work/error.log" | head -1) (log lines naming max_requests)"
echo "workers started: $(grep -c 'worker spawned' "$work/error.log")"

echo "## 10 x SIGHUP under load (4 workers, 50 connections)"
conf "max_requests = 0"; : >"$work/error.log"; start
wrk -t1 -c50 -d"$((dur / 2 + 10))s" "http://127.0.0.1:$port/" >"$work/hup.txt" & w=$!
sleep 3
for i in $(seq 1 10); do
  t0=$(date +%s%N); kill -HUP "$pid"
  until [ "$(grep -c 'reload complete' "$work/error.log")" -ge "$i" ]; do sleep 0.02; done
  echo "HUP $i: all workers on the new config after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
done
wait $w; stop
echo "during 10 HUPs: $(summary "$work/hup.txt")"

echo "## 3 x SIGUSR2 under load"
conf "max_requests = 0"; : >"$work/error.log"; start
wrk -t1 -c50 -d"$((dur / 2 + 10))s" "http://127.0.0.1:$port/" >"$work/usr2.txt" & w=$!
sleep 3
for i in 1 2 3; do
  old=$(cat "$work/gte.pid"); kill -USR2 "$old"
  until [ -f "$work/gte.pid" ] && [ "$(cat "$work/gte.pid")" != "$old" ] && ! kill -0 "$old" 2>/dev/null; do sleep 0.05; done
  echo "USR2 $i: master $old -> $(cat "$work/gte.pid")"
  sleep 2
done
wait $w
kill -TERM "$(cat "$work/gte.pid")"; sleep 1
echo "during 3 USR2: $(summary "$work/usr2.txt")"

echo "## timeout latency (timeout = 1 s, app sleeps 50 ms x 40)"
cat >"$work/slowapp.py" <<'PY'
import time
def app(environ, start_response):
    time.sleep(2)
    start_response("200 OK", [("Content-Type", "text/plain")]); return [b"late\n"]
PY
sed -i "s|wsgi = \"apps:hello\"|wsgi = \"slowapp:app\"|; s|chdir = \"$apps\"|chdir = \"$work\"|" "$work/workers.toml"
start
for i in 1 2 3 4 5; do
  curl -s -o /dev/null -w "504 after %{time_total}s (status %{http_code})\n" "http://127.0.0.1:$port/"
  sleep 0.5
done
stop
rm -rf "$work"

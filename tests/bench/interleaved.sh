#!/usr/bin/env bash
# Peer and gte-supervisor side by side, measured in alternation: both servers run at once (the
# idle one costs nothing measurable), and wrk hits them in turn, SECONDS each, ROUNDS times
# (peer, gte, peer, gte, ..., peer). Each gte run is compared with the mean of the peer runs
# before and after it. This VM's speed drifts by up to 2x between minutes, so two servers
# measured a minute apart (as in one peers.sh run) can differ by that much for no reason of
# their own; alternating short runs cancels most of the drift.
#
# usage: tests/bench/interleaved.sh [APP=hello|flask] [ROUNDS=8] [SECONDS=3] [PEER=granian|uwsgi]
# needs ../shared/bench, wrk, the peers' venv (VENV, default /opt/peers), GTE_BIN.
set -eu
app=${1:-hello} rounds=${2:-8} secs=${3:-3} peer=${4:-granian}
here=$(cd "$(dirname "$0")" && pwd)
bench=${BENCH_DIR:-$here/../../../shared/bench}
venv=${VENV:-/opt/peers}
bin=${GTE_BIN:-$here/../../target/release/gte-supervisor}
conns=${CONNS:-50} w=${WORKERS:-2}
pport=${PORT:-18800} gport=$(( ${PORT:-18800} + 1 ))
case "$app" in
  hello) target=apps:hello path=/ ready=/ lua="" ;;
  flask) target=apps:flask_app path=/predict ready=/health lua="-s $bench/post_predict.lua" ;;
  *) echo "APP must be hello or flask" >&2; exit 2 ;;
esac
export PYTHONPATH="$bench" PYTHONDONTWRITEBYTECODE=1
work=$(mktemp -d /tmp/gte-interleaved.XXXXXX)
case "$peer" in
  granian) setsid "$venv/bin/granian" --interface wsgi --host 127.0.0.1 --port "$pport" --workers "$w" \
             --working-dir "$bench" --log-level warning --no-access-log "$target" >"$work/peer.out" 2>&1 & ;;
  uwsgi) setsid "$venv/bin/uwsgi" --http-socket "127.0.0.1:$pport" --workers "$w" --master \
           --chdir "$bench" --module "$target" --disable-logging --die-on-term >"$work/peer.out" 2>&1 & ;;
  *) echo "PEER must be granian or uwsgi" >&2; exit 2 ;;
esac
ppid=$!
GTE_BIN=$bin ACCESS=off setsid "$here/log-candidate.sh" "$gport" "$w" "$target" "$bench" "$venv/bin/python" \
  >"$work/gte.out" 2>&1 &
gpid=$!
trap 'kill -TERM -- -$ppid -$gpid 2>/dev/null; wait $ppid $gpid 2>/dev/null' EXIT
for p in "$pport" "$gport"; do
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$p$ready" >/dev/null && break; sleep 0.1; done
  wrk -t1 -c"$conns" -d2s $lua "http://127.0.0.1:$p$path" >/dev/null   # warm-up
done
run() { wrk -t1 -c"$conns" -d"${secs}s" $lua "http://127.0.0.1:$1$path" | awk '/Requests\/sec/ {print $2}'; }
echo "app=$app peer=$peer workers=$w conns=$conns rounds=$rounds seconds=$secs"
prev=$(run "$pport")
for i in $(seq 1 "$rounds"); do
  g=$(run "$gport")
  next=$(run "$pport")
  awk -v i="$i" -v g="$g" -v a="$prev" -v b="$next" -v p="$peer" 'BEGIN {
    m = (a + b) / 2; printf "round %d: gte %.0f rps, %s %.0f / %.0f (mean %.0f): %.2fx\n", i, g, p, a, b, m, g / m }' |
    tee -a "$work/rounds"
  prev=$next
done
sort -n -k12 "$work/rounds" | awk '{ x = $NF; sub("x", "", x); r[NR] = x; s += x; g += $4; m += $11 + 0 }
  END { n = NR; med = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
        printf "summary: %d rounds, ratio mean %.2fx, median %.2fx, pooled %.2fx, range %.2f-%.2fx\n", n, s / n, med, g / m, r[1], r[n] }'

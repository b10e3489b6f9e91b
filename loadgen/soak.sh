#!/usr/bin/env bash
# Soak: loadgen churn against the release server for DURATION seconds
# (default 600), sampling the server's RSS every 15 s. Bounded: loadgen's
# --time-limit stops the run, and the server is stopped with SIGTERM at the end.
# Usage: loadgen/soak.sh [DURATION] [RATE]   (run from the repository root,
# after `cargo build --release --bins`). Loopback only.
set -u
DURATION=${1:-600}
RATE=${2:-2000}
PORT=${PORT:-4911}
OUT=${OUT:-target/soak}
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || true
target/release/metalbond server --listen "127.0.0.1:$PORT" 2>"$OUT/server.log" &
SP=$!
trap 'kill -TERM $SP 2>/dev/null' EXIT
sleep 1
(while kill -0 $SP 2>/dev/null; do
    echo "$(date +%T) $(awk '/VmRSS/{print $2}' /proc/$SP/status) kB"
    sleep 15
done) >"$OUT/rss.log" &
target/release/loadgen churn --server "127.0.0.1:$PORT" --server-pid $SP \
    --peers 2000 --vnis 100 --subscriptions 1 --routes 50 \
    --rate "$RATE" --duration "$DURATION" --time-limit $((DURATION + 120)) --quiet
status=$?
sleep 2
echo "server RSS after the peers left: $(awk '/VmRSS/{print $2}' /proc/$SP/status) kB"
echo "RSS samples: $OUT/rss.log"
exit $status

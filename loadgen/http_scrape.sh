#!/bin/bash
# The status pages under load (issue #6, see BENCHMARKS.md "HTTP status
# pages under load"): churn at 2,000 updates/s against a server with --http,
# three times without and three times with a scraper fetching /metrics,
# /peers and /routes.json (every PAUSE seconds; 0 = back to back). Bounded:
# each churn run has --time-limit 40, the scraper stops after 25 s.
# Usage: loadgen/http_scrape.sh [PAUSE]   (after cargo build --release --bins)
# Prints one line per run: churn p50/p99 (us), then scrape times per page.
set -u
cd "$(dirname "$0")/.."
PAUSE=${1:-0}
L=target/release/loadgen
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() { # $1 = with|without, $2 = repetition
  target/release/metalbond server --listen 127.0.0.1:4811 --http 127.0.0.1:9180 2>/dev/null &
  local SP=$!
  sleep 0.5
  local SC=
  if [ "$1" = with ]; then
    ( end=$((SECONDS+25)); while [ $SECONDS -lt $end ]; do
        for p in metrics peers routes.json; do
          curl -s -o /dev/null -w "$p %{time_total} %{size_download}\n" http://127.0.0.1:9180/$p
        done
        sleep "$PAUSE"
      done >> "$OUT/scrapes" ) &
    SC=$!
  fi
  $L churn --server 127.0.0.1:4811 --server-pid $SP --peers 2000 --vnis 100 --subscriptions 1 --routes 50 --rate 2000 --duration 5 --quiet --json --time-limit 40 > "$OUT/churn.json" 2>&1
  if [ -n "$SC" ]; then kill $SC; wait $SC 2>/dev/null; fi
  kill $SP; wait $SP
  echo "$1 $2 $(jq -r '.phases[] | select(.name=="churn") | "p50_us=\(.latency.p50_us) p99_us=\(.latency.p99_us)"' "$OUT/churn.json") passed=$(jq .passed "$OUT/churn.json")"
}
for i in 1 2 3; do run without $i; run with $i; done
for p in metrics peers routes.json; do
  grep "^$p " "$OUT/scrapes" | python3 -c "
import sys, statistics
rows = [l.split() for l in sys.stdin]
t = sorted(float(r[1]) * 1000 for r in rows)
print('$p: n=%d median=%.1f ms max=%.1f ms bytes=%d' % (len(t), statistics.median(t), t[-1], max(int(r[2]) for r in rows)))"
done

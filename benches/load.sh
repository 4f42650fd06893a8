#!/usr/bin/env bash
# End-to-end load test: wrk against the built-in echo upstream directly, then
# through tollgate (a public route, and a keyed route that checks the key,
# a rate limit and credits). Prints req/s, latency, tollgate's memory, and
# checks that the credits charged equal the requests served.
#
# Usage: benches/load.sh [duration]      (default 10s; loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10s}
CONNS=${CONNS:-64}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need curl curl

cargo build --release --quiet
BIN=target/release/tollgate
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN" echo --listen 127.0.0.1:3900 2>/dev/null & PIDS+=($!)
cat > "$WORK/bench.yaml" <<YAML
listen: { proxy: "127.0.0.1:8900", admin: "127.0.0.1:8901", metrics: "127.0.0.1:8902" }
store: { path: "$WORK/store" }
upstreams:
  echo: { url: "http://127.0.0.1:3900" }
tiers:
  bench:
    credits: 1000000000000
    rate_limits:
      requests: { limit: 1000000000, window: 60s }
    features: [api]
routes:
  - { name: keyed, path: /api/data, upstream: echo, feature: api }
  - { name: public, path: /health, upstream: echo, auth: none }
YAML
TOLLGATE_ROOT_KEY=bench RUST_LOG=warn "$BIN" serve --config "$WORK/bench.yaml" --threads 2 2>"$WORK/tollgate.log" & TG=$!; PIDS+=($TG)

for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8900/health && break; sleep 0.1; done
KEY=$(curl -s -X POST http://127.0.0.1:8901/v1/keys -H 'Authorization: Bearer bench' -d '{"tier":"bench"}' \
      | sed -E 's/.*"key":"([^"]+)".*/\1/')

# CPU seconds tollgate has used (user + system): CPU per request is steadier
# than req/s on a shared machine.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$TG/stat"; }

run() { # name, wrk args...
  local name=$1; shift
  local before; before=$(cpu)
  local out; out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency "$@")
  local after; after=$(cpu)
  local rps p50 p99 non2xx total
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  local us; us=$(awk -v a="$after" -v b="$before" -v n="$total" 'BEGIN {printf "%.1f", (a - b) * 1e6 / n}')
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   requests %9s   non-2xx %s   tollgate CPU %s us/req\n' "$name" "$rps" "$p50" "$p99" "$total" "${non2xx:-0}" "$us"
  LAST_TOTAL=$total
}

echo "wrk -t2 -c$CONNS -d$DURATION, all processes on this machine's $(nproc) cores"
run "echo upstream, direct" http://127.0.0.1:3900/api/data
run "tollgate, public route" http://127.0.0.1:8900/health
run "tollgate, keyed route" -H "Authorization: Bearer $KEY" http://127.0.0.1:8900/api/data
KEYED=$LAST_TOTAL
echo "tollgate memory: $(awk '/VmRSS|VmHWM/ {printf "%s %s %s  ", $1, $2, $3}' /proc/$TG/status)"
USED=$(curl -s http://127.0.0.1:8900/_tollgate/usage -H "Authorization: Bearer $KEY" | sed -E 's/.*"credits":\{[^}]*"used":([0-9]+).*/\1/')
echo "credits charged: $USED for $KEYED keyed requests sent (wrk counts completed requests; a few cut off at the end may be charged too)"

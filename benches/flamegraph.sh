#!/usr/bin/env bash
# A flame graph of tollgate's keyed route under load, as compare.sh runs it
# (tollgate pinned to CPU 0 with one worker, wrk and a 1 KB nginx upstream
# on CPU 1), and its top entries.
#
# Usage: benches/flamegraph.sh [tollgate binary] [out.svg]   (also writes out.folded)
#   (default: target/release/tollgate, built first; keyed-flamegraph.svg)
#   KEYS=10000: the traffic spread over that many keys (seeded into the
#   store by benches/seed_keys.rs, one picked at random per request, as
#   compare.sh's 10k-key case does); default one key.
# Needs perf (linux-perf) and inferno (cargo install inferno --locked);
# installs them if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
OUT=${2:-keyed-flamegraph.svg}
if [ -z "$BIN" ]; then
  cargo build --release --quiet --bin tollgate
  BIN=target/release/tollgate
fi
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
command -v wrk >/dev/null && command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx-light curl >/dev/null; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked --quiet

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
mkdir -p "$WORK/nginx" "$WORK/logs"
cat > "$WORK/nginx/up.conf" <<CONF
daemon off; master_process off; worker_processes 1;
pid $WORK/nginx/up.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $WORK/nginx/b; proxy_temp_path $WORK/nginx/p; fastcgi_temp_path $WORK/nginx/f;
  uwsgi_temp_path $WORK/nginx/u; scgi_temp_path $WORK/nginx/s;
  keepalive_requests 1000000; access_log off;
  server { listen 127.0.0.1:3980; location / { return 200 '$BODY'; } }
}
CONF
taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/up.conf" & PIDS+=($!)
cat > "$WORK/tollgate.yaml" <<YAML
listen: { proxy: "127.0.0.1:3981", admin: "127.0.0.1:3982", metrics: "127.0.0.1:3983" }
store: { path: "$WORK/store" }
upstreams:
  up: { url: "http://127.0.0.1:3980" }
tiers:
  bench:
    key_prefix: sk_bench
    credits: 1000000000000
    rate_limits:
      requests: { limit: 1000000000, window: 60s }
    pools:
      exports: { limit: 1000000000000, window: 30d }
    features: [api]
routes:
  - { name: public, path: /health, upstream: up, auth: none }
  - { name: keyed, path: /api/data, upstream: up, feature: api, pools: { exports: 1 } }
YAML
KEYS=${KEYS:-1}
if [ "$KEYS" -gt 1 ]; then
  cargo build --release --quiet --example seed_keys
  target/release/examples/seed_keys "$WORK/store" bench sk_bench "$KEYS" "$WORK/keys.txt" >/dev/null
fi
TOLLGATE_ROOT_KEY=bench taskset -c 0 "$BIN" serve --config "$WORK/tollgate.yaml" --threads 1 \
  2>"$WORK/logs/tollgate.log" & TG=$!; PIDS+=($TG)
for _ in $(seq 500); do curl -s -o /dev/null http://127.0.0.1:3981/health && break; sleep 0.02; done
if [ "$KEYS" -gt 1 ]; then
  export KEYS_FILE="$WORK/keys.txt"
  LOAD=(-s benches/keys.lua)
else
  KEY=$(curl -s -X POST http://127.0.0.1:3982/v1/keys -H 'Authorization: Bearer bench' -d '{"tier":"bench"}' \
        | sed -E 's/.*"key":"([^"]+)".*/\1/')
  LOAD=(-H "Authorization: Bearer $KEY")
fi

# Warm up, then record 8 s of a 10 s run.
taskset -c 1 wrk -t1 -c64 -d3s "${LOAD[@]}" http://127.0.0.1:3981/api/data >/dev/null
(sleep 1; perf record -F 499 --call-graph dwarf,16384 -p "$TG" -o "$WORK/perf.data" -- sleep 8 2>/dev/null >/dev/null) & PERF=$!
taskset -c 1 wrk -t1 -c64 -d10s "${LOAD[@]}" http://127.0.0.1:3981/api/data | grep Requests/sec
wait "$PERF"
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "${OUT%.svg}.folded"
inferno-flamegraph < "${OUT%.svg}.folded" > "$OUT"
echo "flame graph: $OUT (its stacks, one a line: ${OUT%.svg}.folded)"
echo "top entries (self time, % of tollgate's CPU):"
# (|| true: head closing the pipe early is not a failure.)
perf report -i "$WORK/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -20 || true
echo "CPU by part (self time):"
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -5 || true
echo "tollgate's own code (self time, symbols under tollgate::):"
perf report -i "$WORK/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null \
  | grep 'tollgate::' | awk '{s += $1} END {printf "  %.2f%%\n", s}' || true

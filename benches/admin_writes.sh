#!/usr/bin/env bash
# Concurrent admin writes, as an operator's script would send them: wrk
# POSTing key creations at 16 and 32 connections, then credit grants on one
# key at 32, while keyed traffic runs. Prints req/s and latency for each,
# then checks that the gateway still answers, that the grants all landed,
# and that SIGTERM exits 0.
#
# Usage: benches/admin_writes.sh [duration]      (default 5s; loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-5s}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need curl curl
need jq jq

cargo build --release --quiet
BIN=target/release/tollgate
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN" echo --listen 127.0.0.1:3910 2>/dev/null & PIDS+=($!)
cat > "$WORK/bench.yaml" <<YAML
listen: { proxy: "127.0.0.1:8910", admin: "127.0.0.1:8911", metrics: "127.0.0.1:8912" }
store: { path: "$WORK/store" }
upstreams:
  echo: { url: "http://127.0.0.1:3910" }
tiers:
  t: { credits: 1000000000000, features: [api] }
routes:
  - { name: keyed, path: /api/data, upstream: echo, feature: api }
YAML
TOLLGATE_ROOT_KEY=bench RUST_LOG=warn "$BIN" serve --config "$WORK/bench.yaml" --threads 2 2>"$WORK/tollgate.log" & TG=$!; PIDS+=($TG)
for _ in $(seq 100); do curl -sf localhost:8911/healthz >/dev/null && break; sleep 0.1; done

admin() { curl -sf -m 10 -H "Authorization: Bearer bench" "$@"; }
KEY_JSON=$(admin -X POST localhost:8911/v1/keys -d '{"tier":"t"}')
KEY=$(jq -r .key <<<"$KEY_JSON"); KEY_ID=$(jq -r .key_id <<<"$KEY_JSON")
BEFORE=$(admin "localhost:8911/v1/keys/$KEY_ID" | jq .credits.remaining)

cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer bench"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BODY")
done = function(summary, latency, requests)
  local bad = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("  %d requests, %d non-2xx or errors\n", summary.requests, bad))
  local out = io.open(os.getenv("OUT"), "w")
  out:write(summary.requests - bad)
  out:close()
end
LUA
run() { # name conns url body
  echo "== $1 (wrk -t2 -c$2 -d$DURATION)"
  BODY=$4 OUT=$WORK/ok wrk -t2 -c"$2" -d"$DURATION" --latency -s "$WORK/post.lua" "$3" \
    | grep -E "Requests/sec|50%|99%|requests,"
}

# Keyed traffic beside the admin writes.
wrk -t1 -c4 -d60s -H "Authorization: Bearer $KEY" http://127.0.0.1:8910/api/data >/dev/null 2>&1 & KEYED=$!; PIDS+=($KEYED)

run "create keys" 16 http://127.0.0.1:8911/v1/keys '{"tier":"t","credits":100000000}'
run "create keys" 32 http://127.0.0.1:8911/v1/keys '{"tier":"t","credits":100000000}'
kill "$KEYED" 2>/dev/null || true
GRANTS_BEFORE=$(admin "localhost:8911/v1/keys/$KEY_ID" | jq .credits.remaining)
run "grant credits on one key" 32 "http://127.0.0.1:8911/v1/keys/$KEY_ID/credits" '{"op":"add","amount":1}'
GRANTED=$(( $(admin "localhost:8911/v1/keys/$KEY_ID" | jq .credits.remaining) - GRANTS_BEFORE ))

echo "== afterwards"
curl -sf -m 5 localhost:8911/healthz >/dev/null && echo "  /healthz answers"
echo "  keys: $(curl -sf -m 5 localhost:8912/metrics | awk '/^tollgate_keys /{print $2}')"
echo "  store_healthy: $(curl -sf -m 5 localhost:8912/metrics | awk '/^tollgate_store_healthy /{print $2}')"
echo "  the keyed key: $((BEFORE - GRANTS_BEFORE)) credits charged beside the creates"
echo "  grants: $(cat "$WORK/ok") answered 2xx, $GRANTED applied (in flight when wrk stopped may add up to 32)"
kill -TERM "$TG"
for _ in $(seq 300); do kill -0 "$TG" 2>/dev/null || break; sleep 0.1; done
if wait "$TG"; then echo "  SIGTERM: exit 0"; else echo "  SIGTERM: exit $?"; exit 1; fi

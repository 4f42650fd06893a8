#!/usr/bin/env bash
# Runs every fuzz target for a while (default 10 s each) and prints how many
# inputs each one tried. Needs the nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# A crash stops the run with the input saved under fuzz/artifacts/<target>/.
# Usage: fuzz/run.sh [seconds per target] [target ...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-10}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(keys path_route amount config admin_json)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  # New inputs go to a scratch corpus; the committed seeds are read only.
  cargo +nightly fuzz run "$t" "$work/$t" "seeds/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=4096 2>"$work/$t.log" || {
    tail -n 40 "$work/$t.log"
    echo "fuzz target $t failed" >&2
    exit 1
  }
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
  echo "$t: $runs inputs in ${secs}s, no crash"
done

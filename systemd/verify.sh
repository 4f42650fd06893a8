#!/usr/bin/env bash
# Checks systemd/tollgate.service with `systemd-analyze verify`. Works where
# systemd is not PID 1 (a CI container, as root): verify only loads the unit.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-analyze comes with systemd; /bin/kill (ExecReload=) with procps.
# Minimal Debian images have neither.
if ! command -v systemd-analyze >/dev/null 2>&1 || [ ! -x /bin/kill ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends systemd procps >/dev/null
fi

# verify fails when ExecStart's binary is missing, and tollgate is not
# installed here: check a copy that runs /bin/true instead. The copy must be
# named tollgate.service (verify takes the unit name from the file name),
# and keeps every line in place so line numbers in messages still match.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed 's|/usr/local/bin/tollgate|/bin/true|' systemd/tollgate.service >"$tmp/tollgate.service"

# verify exits 0 on warnings (unknown keys, bad values are "ignoring"), so
# any output at all is a failure.
if ! out=$(systemd-analyze verify --man=no "$tmp/tollgate.service" 2>&1) || [ -n "$out" ]; then
  printf '%s\n' "${out//$tmp\//systemd/}" >&2
  echo "systemd/verify.sh: systemd/tollgate.service has problems" >&2
  exit 1
fi
echo "systemd/tollgate.service: ok ($(systemd-analyze --version | head -n1))"

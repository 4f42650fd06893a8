#!/usr/bin/env bash
# Checks the units in systemd/ with `systemd-analyze verify`. Works where
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
# installed here: check copies that run /bin/true instead. A copy keeps its
# unit name (verify takes it from the file name; the template is checked as
# an instance) and every line in place, so line numbers in messages match.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for unit in tollgate.service tollgate@.service; do
  name=${unit/@./@blue.}
  sed 's|/usr/local/bin/tollgate|/bin/true|' "systemd/$unit" >"$tmp/$name"
  # verify exits 0 on warnings (unknown keys, bad values are "ignoring"), so
  # any output at all is a failure.
  if ! out=$(systemd-analyze verify --man=no "$tmp/$name" 2>&1) || [ -n "$out" ]; then
    printf '%s\n' "${out//$tmp\//systemd/}" >&2
    echo "systemd/verify.sh: systemd/$unit has problems" >&2
    status=1
  else
    echo "systemd/$unit: ok ($(systemd-analyze --version | head -n1))"
  fi
done
exit $status

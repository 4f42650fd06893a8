#!/usr/bin/env bash
# Zero-downtime upgrade under systemd, with the blue/green template
# (tollgate@.service). Install the new binary first, then run this as root:
# it starts the idle colour, which takes the listening sockets and then the
# store from the running one; the old colour drains, flushes and exits 0.
set -euo pipefail

if systemctl is-active --quiet tollgate@blue; then
  old=blue new=green
elif systemctl is-active --quiet tollgate@green; then
  old=green new=blue
else
  echo "neither tollgate@blue nor tollgate@green is running; start one with: systemctl enable --now tollgate@blue" >&2
  exit 1
fi

echo "handing over from tollgate@$old to tollgate@$new"
systemctl start "tollgate@$new"

# The old colour exits by itself once drained (bounded by --drain-timeout
# plus Pingora's 5 s hand-over).
for _ in $(seq 60); do
  if ! systemctl is-active --quiet "tollgate@$old"; then
    # Boot the colour that is serving now.
    systemctl disable --quiet "tollgate@$old"
    systemctl enable --quiet "tollgate@$new"
    echo "tollgate@$new is serving; tollgate@$old has stopped"
    exit 0
  fi
  sleep 1
done
echo "tollgate@$old is still running after 60 s: see journalctl -u tollgate@$old -u tollgate@$new" >&2
exit 1

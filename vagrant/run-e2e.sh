#!/usr/bin/env bash
# End-to-end across the VMs: XDP relay on real virtio NICs, two transceivers, aiortc clients.
# Usage: cd vagrant && vagrant up && ./run-e2e.sh [SESSIONS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
sessions=${1:-4}
seconds=${2:-10}
sr=/srv/splitrelay/.venv/bin/splitrelay
py=/srv/splitrelay/.venv/bin/python

say() { printf 'e2e: %s\n' "$*"; }
on() { local vm=$1; shift; vagrant ssh "$vm" -c "sudo bash -s" -- -q <<<"$*"; }
iface_of() { on "$1" "ip -o addr show to $2 | awk '{print \$2}'" | tr -d '\r'; }

pub=$(iface_of relay 192.168.56.2)
int=$(iface_of relay 192.168.57.2)
say "relay: public $pub, internal $int (native XDP on virtio-net)"
on relay "systemctl stop sr-edge 2>/dev/null; systemd-run --unit sr-edge $sr -v edge serve $pub \
  --internal $int --public-ip 192.168.56.2 --gateway-ip 192.168.56.10 --listen 192.168.57.2:8470 \
  --mode native --detach-on-exit"
for i in 1 2; do
  on "t$i" "systemctl stop sr-t 2>/dev/null; systemd-run --unit sr-t $sr -v transceiver serve \
    --backend-id $i --bind 192.168.57.1$i:5000 --relay 192.168.56.2:3478 \
    --relay-control http://192.168.57.2:8470 --whip-listen 192.168.58.1$i:8080 --handler echo"
done
for _ in $(seq 1 60); do
  on t2 "curl -sf http://192.168.58.12:8080/healthz" >/dev/null 2>&1 && break
  sleep 1
done
say "running $sessions sessions for $seconds s from the client VM"
set +e
report=$(on client "$py -m splitrelay.client.probe http://192.168.58.11:8080/whip \
  http://192.168.58.12:8080/whip --sessions $sessions --duration $seconds")
status=$?
set -e
echo "$report" | python3 -c 'import json,sys
for r in json.loads(sys.stdin.read()):
    print("%-5s %s ice %.0f ms dtls %.0f ms audio rtt %s ms beeps %d/%d %s" % (
        "ok" if r["ok"] else "FAIL", r["whip_url"], r["ice_connected_ms"] or -1, r["dtls_connected_ms"] or -1,
        r["audio_rtt_median_ms"], r["beeps_heard"], r["beeps_sent"], r["error"] or ""))' 2>/dev/null \
  || echo "$report"
on relay "$sr stats --control http://192.168.57.2:8470"
on relay "systemctl stop sr-edge"; for i in 1 2; do on "t$i" "systemctl stop sr-t"; done
exit $status

#!/usr/bin/env bash
# End-to-end across the VMs, on the guest's own stock kernel: the relay VM runs deploy/systemd's
# splitrelay-edge unit with its XDP programs in native mode on virtio_net (generic XDP fails the
# check), the transceiver VM the splitrelay-transceiver@ unit, the client VM real aiortc WHIP
# sessions whose audio the transceiver echoes; then the BPF_PROG_TEST_RUN corpus (tests/xdp,
# fuzz included) runs on the relay VM's kernel.
#
# Usage: cd vagrant && vagrant up && ./run-e2e.sh [SESSIONS] [SECONDS]   (make vm-test does all of it,
# inside libvirt's network namespace).  Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")"
case ${1:-} in -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
sessions=${1:-2}
seconds=${2:-10}
fuzz_examples=${SPLITRELAY_VM_FUZZ_EXAMPLES:-300}
# SPLITRELAY_VM_SHORT=1 (the default here) leaves out the three tests that compile relay.c again
# to reload it over pinned maps, as make vm-check does: pinning does not depend on the kernel, and
# each compile costs minutes under TCG.  0 runs all of tests/xdp (make vm-matrix does).
short=
[ "${SPLITRELAY_VM_SHORT:-1}" = 1 ] && short="not reload and not another_layout"
venv=/opt/splitrelay/.venv
token=$(cat .vagrant/sr-token)
whip_key=$(cat .vagrant/sr-whip-key)

say() { printf 'e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAIL: %s\n' "$*" >&2; failed=1; }
failed=0

# One `vagrant ssh-config`, then plain ssh: each `vagrant ssh` costs several seconds of Ruby.
vagrant ssh-config relay transceiver client >.vagrant/ssh-config 2>/dev/null \
  || { echo "e2e: error: the VMs are not up (vagrant up first)" >&2; exit 1; }
on() { local vm=$1; shift; ssh -F .vagrant/ssh-config -o LogLevel=ERROR "$vm" sudo bash -s <<<"$*"; }
# Poll a condition on a VM, at most $2 seconds (each try is one ssh round trip).
wait_on() {
  local vm=$1 limit=$2 t0=$SECONDS; shift 2
  until on "$vm" "$*" >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$limit" ] || return 1
    sleep 1
  done
}

say "kernels: relay $(on relay uname -r), transceiver $(on transceiver uname -r), client $(on client uname -r)"

# -- the relay's systemd unit, native XDP on virtio_net ---------------------------------------
t0=$SECONDS
on relay "systemctl restart splitrelay-edge"
# the agent compiles relay.c with the guest's clang and 6.1's verifier walks ~300k instructions
# first: over 10 min under TCG with three guests on 2 busy host cores (2026-11-28, load ~5)
wait_on relay "${SPLITRELAY_VM_EDGE_WAIT:-1500}" "curl -sf http://192.168.57.2:8470/v1/health" \
  || { on relay "journalctl -u splitrelay-edge --no-pager | tail -n 20" >&2 || true; echo "e2e: error: splitrelay-edge did not come up" >&2; exit 1; }
say "relay: splitrelay-edge.service up in $((SECONDS - t0)) s"
# shellcheck disable=SC2016
links=$(on relay 'set -e; . /etc/splitrelay/edge.env
  for dev in $PUBLIC_IFACE $INTERNAL_IFACE; do
    printf "%s driver=%s queues=%s %s\n" $dev "$(ethtool -i $dev | sed -n "s/^driver: //p")" \
      "$(ls -d /sys/class/net/$dev/queues/tx-* | wc -l)" "$(ip -d link show dev $dev | grep -o "prog/xdp[a-z]* id [0-9]*" | head -n1)"
  done')
echo "$links" | sed 's/^/e2e: relay /'
while read -r dev driver _ prog; do
  [ "$driver" = driver=virtio_net ] || fail "$dev is not virtio_net ($driver)"
  case $prog in
    "prog/xdp id "*) ;;                                  # native (driver) mode
    "prog/xdpgeneric"*) fail "$dev: XDP fell back to generic mode" ;;
    *) fail "$dev: no XDP program attached" ;;
  esac
done <<<"$links"

# -- a real WebRTC voice session: client VM -> relay VM (XDP) -> transceiver VM, echoed --------
on transceiver "systemctl restart splitrelay-transceiver@1"
wait_on transceiver 300 "curl -sf http://192.168.58.11:8080/healthz" \
  || { on transceiver "journalctl -u splitrelay-transceiver@1 --no-pager | tail -n 20" >&2 || true; echo "e2e: error: transceiver did not come up" >&2; exit 1; }
say "transceiver: splitrelay-transceiver@1.service up"
say "running $sessions WHIP session(s) for $seconds s from the client VM"
t0=$SECONDS
set +e
# the app backend's part: an offer token for the transceiver's pool, minted with its key
report=$(on client "umask 077; echo $whip_key > /tmp/whip.key
  SPLITRELAY_WHIP_TOKEN=\$($venv/bin/splitrelay token mint --key-file /tmp/whip.key --audience e2e --ttl 600) \
  timeout $((seconds + 240)) $venv/bin/python -m splitrelay.client.probe \
  http://192.168.58.11:8080/whip --sessions $sessions --duration $seconds")
status=$?
set -e
say "sessions took $((SECONDS - t0)) s"
echo "$report" | python3 -c 'import json, sys
for r in json.loads(sys.stdin.read()):
    print("e2e: %-4s ice %.0f ms dtls %.0f ms audio rtt %s ms beeps echoed %d/%d %s" % (
        "ok" if r["ok"] else "FAIL", r["ice_connected_ms"] or -1, r["dtls_connected_ms"] or -1,
        r["audio_rtt_median_ms"], r["beeps_heard"], r["beeps_sent"], r["error"] or ""))' 2>/dev/null \
  || echo "$report"
[ $status = 0 ] || fail "voice sessions through the relay VM did not all hear their echo"
# the media went through XDP: the relay's counters saw it forwarded both ways
counters=$(on relay "$venv/bin/splitrelay stats --json --control http://192.168.57.2:8470 --token $token")
python3 - "$counters" <<'PY' || fail "the relay's XDP counters do not show media forwarded both ways"
import json, sys
forwarded = {}
for c in json.loads(sys.argv[1])["counters"]:
    if c["verdict"] == "forwarded":
        forwarded[c["direction"]] = forwarded.get(c["direction"], 0) + c["packets"]
nonzero = [f"{c['direction']}/{c['verdict']}/{c['reason']}={c['packets']}"
           for c in json.loads(sys.argv[1])["counters"] if c["packets"]]
print("e2e: relay XDP counters:", " ".join(nonzero))
sys.exit(0 if forwarded.get("ingress") and forwarded.get("egress") else 1)
PY
on transceiver "systemctl stop splitrelay-transceiver@1" || true

# -- the BPF_PROG_TEST_RUN corpus on this kernel ------------------------------------------------
say "BPF_PROG_TEST_RUN corpus (tests/xdp${short:+ -k \"$short\"}, $fuzz_examples fuzz cases) on the relay's kernel"
t0=$SECONDS
# From a copy of tests/ alone: run in /srv/splitrelay, its splitrelay/ directory (the exception
# base only) shadows the installed package ("No module named 'splitrelay.edge'", first run).
if on relay "set -o pipefail; rm -rf /tmp/sr-tests && mkdir /tmp/sr-tests && cp -r /srv/splitrelay/tests /srv/splitrelay/pyproject.toml /tmp/sr-tests/ \
    && cd /tmp/sr-tests && SPLITRELAY_FUZZ_EXAMPLES=$fuzz_examples timeout 1200 \
    $venv/bin/python -m pytest -q -x --tb=short --timeout=0 --color=no -p no:cacheprovider ${short:+-k \"$short\"} tests/xdp 2>&1 | tail -n 25"; then
  say "corpus passed in $((SECONDS - t0)) s"
else
  fail "the BPF_PROG_TEST_RUN corpus failed on the relay's kernel"
fi
on relay "systemctl stop splitrelay-edge; $venv/bin/splitrelay edge detach \$(. /etc/splitrelay/edge.env; echo \$PUBLIC_IFACE \$INTERNAL_IFACE)" >/dev/null 2>&1 || true
[ $failed = 0 ] && say "PASS" || say "FAIL"
exit $failed

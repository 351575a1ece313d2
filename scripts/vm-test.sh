#!/usr/bin/env bash
# The full VM run, per Debian release: vagrant up the three VMs, vagrant/run-e2e.sh, vagrant
# destroy -f, always (also on failure or Ctrl-C).  libvirt runs in its own network namespace for
# the duration (scripts/vm-libvirt.sh) and is stopped again if this script started it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/vm-test.sh [RELEASE...]

For each RELEASE (bookworm = Debian 12, the default; trixie = Debian 13): vagrant up client, relay
and transceiver from the box splitrelay/debian<N> (make vm-box builds it), run vagrant/run-e2e.sh
(native XDP on virtio_net, an echoed WebRTC voice session through the relay VM, the
BPF_PROG_TEST_RUN corpus on the guest kernel), then vagrant destroy -f.  Prints one PASS/FAIL
line per release with its timings; exit 0 only if all passed.

Environment: VM_SESSIONS (2), VM_SECONDS (10), SPLITRELAY_VM_FUZZ_EXAMPLES (300).
Example: make vm-test VM_RELEASES="bookworm trixie"
EOF
}
case ${1:-} in -h|--help) usage; exit 0 ;; esac

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
require_root "libvirt, network namespaces"
require_tools vagrant virsh libvirtd qemu-system-x86_64 ssh rsync
releases=("${@:-bookworm}")
for r in "${releases[@]}"; do
  box=$(box_name "$r"); [ -n "$box" ] || die "unknown release $r (bookworm or trixie)" 2
  box_added "$box" || die "box $box is missing: run make vm-box VM_RELEASES=$r" 4
done

started_libvirt=0
libvirt_running || started_libvirt=1
destroy() {
  local dom
  say "vagrant destroy -f"
  (cd "$here/vagrant" && in_vm_netns vagrant destroy -f >/dev/null 2>&1) || true
  # a vagrant killed mid-create leaves domains vagrant no longer knows: remove them by name
  for dom in $(virsh -q -c qemu:///system list --all --name 2>/dev/null | grep '^splitrelay-'); do
    virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
    virsh -q -c qemu:///system undefine "$dom" >/dev/null 2>&1 || true
    rm -f "$LIBVIRT_POOL_DIR/$dom.img"
    say "removed leftover domain $dom"
  done
}
cleanup() {
  destroy
  [ $started_libvirt = 0 ] || bash "$here/scripts/vm-libvirt.sh" stop
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bash "$here/scripts/vm-libvirt.sh" start
export SPLITRELAY_VM_DRIVER
SPLITRELAY_VM_DRIVER=$(vm_driver)
say "libvirt driver $SPLITRELAY_VM_DRIVER ($(vm_accel_label))"

results=()
status=0
for r in "${releases[@]}"; do
  export SPLITRELAY_BOX
  SPLITRELAY_BOX=$(box_name "$r")
  destroy   # leftovers of an interrupted run
  say "[$r] vagrant up client relay transceiver from $SPLITRELAY_BOX"
  t0=$SECONDS
  log=$here/vagrant/.vagrant/up-$r.log
  mkdir -p "$(dirname "$log")"
  if ! (cd "$here/vagrant" && in_vm_netns vagrant up --provider=libvirt >"$log" 2>&1); then
    tail -n 15 "$log" >&2
    results+=("$r: FAIL (vagrant up, see $log)"); status=1; destroy; continue
  fi
  up=$((SECONDS - t0))
  say "[$r] VMs up and provisioned in $up s"
  t0=$SECONDS
  if in_vm_netns "$here/vagrant/run-e2e.sh" "${VM_SESSIONS:-2}" "${VM_SECONDS:-10}"; then
    results+=("$r: PASS (up $up s, e2e $((SECONDS - t0)) s)")
  else
    results+=("$r: FAIL (up $up s, e2e $((SECONDS - t0)) s)"); status=1
  fi
  t0=$SECONDS
  destroy
  say "[$r] destroyed in $((SECONDS - t0)) s"
done
for line in "${results[@]}"; do say "$line"; done
exit $status

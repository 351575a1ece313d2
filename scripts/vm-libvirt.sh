#!/usr/bin/env bash
# Start or stop libvirtd and virtlogd inside a network namespace of their own.
#
# PID 1 on this kind of host is not systemd, so nothing starts libvirt for us; started by hand
# inside the namespace $VM_NETNS (no link to eth0, no route), every bridge, dnsmasq and firewall
# rule libvirt makes stays there.  `stop` ends only the daemons this script started (their pid
# files, checked to be in that namespace) after destroying the networks they run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/vm-libvirt.sh start|stop|status

  start   create network namespace srvm (no uplink, no route) and run libvirtd + virtlogd in it;
          idempotent.  Run vagrant with: ip netns exec srvm vagrant ...
  stop    destroy libvirt's networks, end the two daemons (by pid), delete the namespace
  status  say whether they run

Environment: SPLITRELAY_VM_NETNS (default srvm).
EOF
}

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
virsh_() { virsh -q -c qemu:///system "$@"; }

start() {
  require_tools libvirtd virtlogd virsh
  ip netns list | grep -qw "^$VM_NETNS" || { ip netns add "$VM_NETNS"; say "created network namespace $VM_NETNS"; }
  ip -n "$VM_NETNS" link set lo up
  if libvirt_running; then say "libvirtd already running in $VM_NETNS"; return; fi
  [ ! -s /run/libvirtd.pid ] || ! kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null \
    || die "a libvirtd outside namespace $VM_NETNS is running (pid $(cat /run/libvirtd.pid)): not touching it" 1
  # libvirt's stock "default" network is a NAT to the host's uplink: never autostart it.
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml
  kill -0 "$(cat /run/virtlogd.pid 2>/dev/null)" 2>/dev/null || in_vm_netns virtlogd -d
  if [ "$(vm_driver)" = qemu ] && [ -e /dev/kvm ]; then
    # KVM cannot boot a stock guest here, yet libvirt sees /dev/kvm, probes qemu with
    # accel=kvm:tcg, and re-probes its capabilities on nearly every call (measured: a probe
    # every ~2 s, vagrant up stuck over 8 min "Creating domain").  Masked in libvirtd's own mount
    # namespace, /dev/kvm stays as it is for everything else on the host.
    in_vm_netns unshare --mount --propagation private sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd -d'
  else
    in_vm_netns libvirtd -d
  fi
  local i
  for i in $(seq 1 60); do virsh_ version >/dev/null 2>&1 && break; sleep 0.5; done
  virsh_ version >/dev/null 2>&1 || die "libvirtd did not answer on qemu:///system within 30 s" 1
  if ! virsh_ pool-info default >/dev/null 2>&1; then
    mkdir -p "$LIBVIRT_POOL_DIR"
    virsh_ pool-define-as default dir --target "$LIBVIRT_POOL_DIR" >/dev/null
  fi
  # Captured, not piped into grep -q: under pipefail, grep -q quitting early SIGPIPEs virsh and
  # the check fails even when the pool runs (what broke the first make vm-test run here).
  pool_running() { [[ $(virsh_ pool-info default 2>/dev/null) == *running* ]]; }
  for i in $(seq 1 20); do
    pool_running && break
    virsh_ pool-start default >/dev/null 2>&1 || sleep 0.5   # may be active already (autostart)
  done
  pool_running || die "libvirt storage pool default is not running" 1
  say "libvirtd $(cat /run/libvirtd.pid) and virtlogd $(cat /run/virtlogd.pid) running in $VM_NETNS"
}

stop() {
  local net pid
  if libvirt_running; then
    for net in $(virsh_ net-list --name 2>/dev/null); do virsh_ net-destroy "$net" >/dev/null 2>&1 || true; done
    pid=$(cat /run/libvirtd.pid)
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    say "stopped libvirtd ($pid)"
  fi
  pid=$(cat /run/virtlogd.pid 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(ip netns identify "$pid")" = "$VM_NETNS" ]; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    say "stopped virtlogd ($pid)"
  fi
  if ip netns list | grep -qw "^$VM_NETNS"; then
    [ -z "$(ip netns pids "$VM_NETNS")" ] || die "processes still run in $VM_NETNS: $(ip netns pids "$VM_NETNS" | xargs)" 1
    ip netns del "$VM_NETNS"; say "deleted network namespace $VM_NETNS"
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) if libvirt_running; then say "running in $VM_NETNS (libvirtd $(cat /run/libvirtd.pid))"; else say "not running"; exit 1; fi ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac

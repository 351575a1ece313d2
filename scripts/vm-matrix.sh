#!/usr/bin/env bash
# The short kernel matrix: boot each box's stock Debian kernel under qemu (TCG here) with no
# libvirt, Vagrant or network, load the relay's XDP programs in it and run the BPF_PROG_TEST_RUN
# corpus there.  The verifier's acceptance differs between kernels: this is what proves the
# relay loads and decides the same on each.  The guests run in parallel, one vCPU each.
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: scripts/vm-matrix.sh [RELEASE...]

Boot the kernel of each box (bookworm = Debian 12, trixie = Debian 13; default: every release
whose box make vm-box has built) under qemu with the box's disk as a throw-away snapshot and
the checkout shared read-only over 9p; the guest loads the relay and runs tests/xdp.
Prints one PASS/FAIL line per kernel; exit 0 only if all passed.

Environment: SPLITRELAY_VM_FUZZ_EXAMPLES (default 300), VM_MATRIX_TIMEOUT (s per guest, 1500),
SPLITRELAY_VM_SHORT=1 (leave out the tests that recompile relay.c to reload it; make vm-check).
EOT
}
case ${1:-} in -h|--help) usage; exit 0 ;; esac

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
require_root "9p share of the checkout, qemu"
require_tools qemu-system-x86_64
if [ $# -gt 0 ]; then releases=("$@"); else
  releases=()
  for r in bookworm trixie; do [ -f "$VM_CACHE/$r/disk.stamp" ] && releases+=("$r"); done
  [ ${#releases[@]} -gt 0 ] || die "no box built yet: run make vm-box" 4
fi
fuzz=${SPLITRELAY_VM_FUZZ_EXAMPLES:-300}
accel=$(vm_accel)
say "accelerator: $(vm_accel_label)"

pids=()
for r in "${releases[@]}"; do
  dir=$VM_CACHE/$r
  [ -f "$dir/disk.stamp" ] || die "no disk for $r: run make vm-box VM_RELEASES=$r" 4
  kernel=$(ls "$dir"/rootfs/boot/vmlinuz-* | sort -V | tail -n1)
  initrd=$(ls "$dir"/rootfs/boot/initrd.img-* | sort -V | tail -n1)
  say "[$r] booting $(basename "$kernel")"
  # PID 1 is a shell: mount the share, run the guest script, power off (its output is the console).
  run="mount -t proc proc /proc; modprobe -q 9pnet_virtio; modprobe -q 9p;
       mount -t 9p -o trans=virtio,version=9p2000.L,ro sr /mnt && SPLITRELAY_FUZZ_EXAMPLES=$fuzz SPLITRELAY_VM_SHORT=${SPLITRELAY_VM_SHORT:-0} sh /mnt/scripts/vm-matrix-guest.sh;
       echo o > /proc/sysrq-trigger; sleep 60"
  timeout "${VM_MATRIX_TIMEOUT:-1500}" qemu-system-x86_64 -accel "$accel" -m 1536 -smp 1 -nographic -no-reboot \
    -nic none -snapshot -drive file="$dir/disk.raw",format=raw,if=virtio \
    -virtfs local,path="$here",mount_tag=sr,security_model=none,readonly=on \
    -kernel "$kernel" -initrd "$initrd" \
    -append "root=LABEL=root ro console=ttyS0 panic=-1 loglevel=4 init=/bin/sh -- -c \"$(echo $run)\"" \
    </dev/null >"$dir/matrix.log" 2>&1 &
  pids+=($!)
done
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

status=0
t0=$SECONDS
for i in "${!releases[@]}"; do
  r=${releases[$i]}; log=$VM_CACHE/$r/matrix.log
  wait "${pids[$i]}" || true
  kver=$(sed -n 's/^sr-matrix: kernel \([^ ]*\) .*/\1/p' "$log" | head -n1)
  summary=$(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$log" | tail -n1 | tr -d '\r=')
  if grep -q '^sr-matrix: result 0 ' "$log"; then
    say "[$r] kernel ${kver:-?}: PASS ($summary; $((SECONDS - t0)) s)"
  else
    say "[$r] kernel ${kver:-unknown}: FAIL (${summary:-no test summary}; console in $log)"
    grep -E 'FAILED|Error|error:' "$log" | head -n 10 >&2 || true
    status=1
  fi
done
exit $status

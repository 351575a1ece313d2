#!/bin/sh
# Runs as PID 1's payload inside a kernel-matrix guest (scripts/vm-matrix.sh): the box's root file
# system on a throw-away qemu snapshot, the checkout shared read-only over 9p at /mnt.  Loads the
# relay's XDP programs with the guest's bcc against the guest kernel's own headers and runs the
# BPF_PROG_TEST_RUN corpus (tests/xdp, fuzz included) on that kernel.
mount -t sysfs sys /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -o remount,rw /            # writes land in qemu's snapshot, never in the box
ip link set lo up
# A copy of the sources on tmpfs, and a splitrelay package made of symlinks (what pip install
# would map in pyproject.toml): no build step under TCG.
mkdir -p /tmp/sr/pkg
for d in splitrelay wire bpf edge transceiver client lab cli bench tests; do cp -r "/mnt/$d" /tmp/sr/; done
cp /mnt/pyproject.toml /tmp/sr/
ln -s /tmp/sr/splitrelay /tmp/sr/pkg/splitrelay      # the root package; the others map into it
for d in wire bpf edge transceiver client lab cli bench; do ln -s "/tmp/sr/$d" "/tmp/sr/splitrelay/$d"; done
cd /tmp/sr || exit 1
echo "sr-matrix: kernel $(uname -r) booted in $(cut -d' ' -f1 /proc/uptime) s; running tests/xdp"
# -x: on a TCG guest of a busy 2-core host each test costs seconds, so the first failure's
# traceback is printed at once instead of after the whole module (measured: one fixture error
# repeated for 60+ tests ran into the 25 min timeout).  --timeout=0: bcc's compile of relay.c
# alone outran pytest-timeout's 300 s there; the host's qemu timeout bounds the whole run.
# SPLITRELAY_VM_SHORT=1 (make vm-check, CI): leave out the tests that compile relay.c again to
# reload it over pinned maps (pinning is kernel-independent and the host suite covers it): under
# TCG each compile costs minutes.
short=
[ "${SPLITRELAY_VM_SHORT:-0}" = 1 ] && short="not reload and not another_layout"
PYTHONPATH=/tmp/sr/pkg PYTHONDONTWRITEBYTECODE=1 /opt/splitrelay/.venv/bin/python -m pytest -q -x --tb=short --timeout=0 \
  -p no:cacheprovider --color=no ${short:+-k "$short"} tests/xdp 2>&1
echo "sr-matrix: result $? after $(cut -d' ' -f1 /proc/uptime) s"

#!/usr/bin/env bash
# The short kernel-matrix check that .ci/run runs after `make test` (issue 14): each stock Debian
# kernel (12: 6.1, 13: 6.12) boots under qemu, compiles the relay with its release's bcc, loads
# the XDP programs and runs tests/xdp (the BPF_PROG_TEST_RUN corpus, a small fuzz count) there.
# The boxes are built or reused from the cache (make vm-box: ~11 s when cached).  Where the VM
# tools or a box cannot be had (not root, no apt mirror), it skips with one line and exits 0;
# a kernel that was booted and fails is a failure.  `make vm-test` is the full three-VM run.
set -uo pipefail

case ${1:-} in -h|--help)
  cat <<'EOT'
Usage: scripts/vm-check.sh   (make vm-check)

Build or reuse the boxes of VM_RELEASES (default: bookworm trixie), then run the kernel matrix
(scripts/vm-matrix.sh) on those that exist.  Skips (exit 0, one line) when none can be had.
Environment: VM_RELEASES, SPLITRELAY_VM_FUZZ_EXAMPLES (default 100 here), VM_MATRIX_TIMEOUT
(s per guest, default 1500; the guests run in parallel, one vCPU each).
EOT
  exit 0 ;;
esac

here=$(cd "$(dirname "$0")/.." && pwd)
skip() { echo "vm-check: skipped: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "the kernel matrix needs root (qemu with a 9p share, debootstrap)"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
bash "$here/scripts/vm-deps.sh" >"$logs/deps" 2>&1 \
  || skip "the VM tools cannot be installed ($(tail -n1 "$logs/deps"))"
built=() missing=()
for r in ${VM_RELEASES:-bookworm trixie}; do
  if bash "$here/scripts/vm-box.sh" "$r" >"$logs/$r" 2>&1; then
    built+=("$r")
  else
    missing+=("$r: $(tail -n1 "$logs/$r")")
  fi
done
[ ${#built[@]} -gt 0 ] || skip "no box is built and none can be built (${missing[*]})"
for m in "${missing[@]}"; do echo "vm-check: not checked, no box for ${m}"; done
t0=$SECONDS
SPLITRELAY_VM_SHORT=1 SPLITRELAY_VM_FUZZ_EXAMPLES=${SPLITRELAY_VM_FUZZ_EXAMPLES:-100} VM_MATRIX_TIMEOUT=${VM_MATRIX_TIMEOUT:-1500} \
  bash "$here/scripts/vm-matrix.sh" "${built[@]}"
status=$?
echo "vm-check: ${built[*]} in $((SECONDS - t0)) s (status $status)"
exit $status

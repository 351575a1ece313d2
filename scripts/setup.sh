#!/usr/bin/env bash
# Prepare this host for splitrelay: idempotent, safe to run again at any time.
#
# bcc's Python module comes from Debian (python3-bpfcc), not PyPI, so the venv is
# built on Debian's /usr/bin/python3 with --system-site-packages.  bcc compiles the
# XDP program at load time against kernel headers; when the running kernel has no
# headers package we link the distribution's newest header tree (XDP only uses
# stable UAPI structs, so any recent tree works).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${SPLITRELAY_VENV:-$here/.venv}
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (XDP, BPF maps and network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)"
[ -e /sys/kernel/btf/vmlinux ] || say "warning: kernel has no BTF (/sys/kernel/btf/vmlinux); bcc still works without it"

# Every program the code and the tests run is in this list (tests/test_setup_programs.py checks it):
# iptables for the floating-address fault's edge NAT (lab/floating.py), procps for sysctl, git for the
# commit a benchmark records, openssl for the self-signed Kubernetes API in tests/test_control_auth.py.
apt_pkgs=(python3 python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2 ethtool python3-venv python3-dev
          gcc make libc6-dev util-linux prometheus vagrant systemd
          libespeak-ng1 espeak-ng-data iptables procps git openssl nftables)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed (is the package mirror reachable?)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  # Debian's prometheus package starts a system service we do not want.
  if systemctl is-active --quiet prometheus 2>/dev/null; then systemctl stop prometheus || true; fi
else
  say "apt packages present"
fi

# A real browser for tests/test_browser.py: Debian's chromium, driven by the Python playwright
# package below (which never downloads a browser of its own).  Optional: without it those tests skip.
if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed'; then
  say "installing chromium (browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    say "warning: apt-get install chromium failed: the browser tests will skip"
  fi
fi

# Non-browser WebRTC callers for tests/test_dtls_setup.py and bench/dtls_setup.py: npm's node-datachannel
# (libdatachannel; its native library ships in the npm package @node-datachannel/linux-x64-gnu, so nothing
# is fetched from outside the registry) and werift, pinned in client/node/package-lock.json.  Optional:
# without node those tests skip.
node_dir=$here/client/node
if ! command -v npm >/dev/null; then
  say "installing nodejs and npm (non-browser WebRTC callers)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; } \
    || say "warning: apt-get install nodejs npm failed: the libdatachannel/werift tests will skip"
fi
if command -v npm >/dev/null && ! [ "$node_dir/node_modules/.package-lock.json" -nt "$node_dir/package-lock.json" ]; then
  say "installing the npm WebRTC callers (npm ci in client/node)"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || say "warning: npm ci in $node_dir failed: the libdatachannel/werift tests will skip"
fi

# Kernel headers for bcc.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ -e "$moddir/build/Makefile" ] && [ -e "$moddir/source/include/uapi/linux/bpf.h" -o -e "$moddir/build/include/uapi/linux/bpf.h" ]; then
  say "kernel headers for $kver present ($moddir/build)"
else
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$common" ] && [ -n "$arch" ] || die "no kernel headers for $kver and no Debian header tree in /usr/src (apt-get install linux-headers-amd64)"
  mkdir -p "$moddir"
  ln -sfn "$arch" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
  say "running kernel $kver has no headers package: linked $moddir/build -> $arch and source -> $common"
fi

# bpffs for pinned maps.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf (kernel without CONFIG_BPF_SYSCALL?)"
  say "mounted bpffs on /sys/fs/bpf"
fi

/usr/bin/python3 -c 'import bcc' 2>/dev/null || die "python3-bpfcc is installed but 'import bcc' fails under /usr/bin/python3"

if [ ! -x "$venv/bin/python" ]; then
  say "creating venv $venv (system site-packages, for bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
say "installing splitrelay (editable) and its Python dependencies"
"$venv/bin/python" -m pip install -q -e "$here[dev,bench,browser,voice,whisper,pipecat]" || die "pip install failed"
"$venv/bin/python" -m pip show torch >/dev/null 2>&1 && say "warning: torch is installed; the voice extras do not need it"

# The load generator used by the benchmarks.
if [ -f "$here/bench/Makefile" ]; then make -s -C "$here/bench" >/dev/null; fi

"$venv/bin/python" - <<'PY' || die "BPF self-check failed: this kernel or bcc cannot load an XDP program"
from bcc import BPF
b = BPF(text="int xdp_ok(struct xdp_md *ctx) { return XDP_PASS; }")
b.load_func("xdp_ok", BPF.XDP)
PY
say "ok: bcc loads XDP programs; activate with: . $venv/bin/activate"

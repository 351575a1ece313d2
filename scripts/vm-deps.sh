#!/usr/bin/env bash
# Install what the VM targets need from Debian: qemu (TCG works where KVM does not), debootstrap,
# libvirt and vagrant-libvirt.  Idempotent; says in one line what it installs or what is missing.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils debootstrap fdisk e2fsprogs libvirt-daemon-system libvirt-daemon-driver-qemu
      libvirt-clients dnsmasq-base vagrant vagrant-libvirt rsync openssh-client curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then echo "vm-deps: all present"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "vm-deps: error: missing ${missing[*]}; run as root to install them" >&2; exit 3; }
echo "vm-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "vm-deps: error: apt-get update failed (is the mirror reachable?)" >&2; exit 4; }
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || { echo "vm-deps: error: apt-get install ${missing[*]} failed" >&2; exit 4; }
# Debian's libvirt package enables a NAT network to the host's uplink: never start it on its own.
rm -f /etc/libvirt/qemu/networks/autostart/default.xml

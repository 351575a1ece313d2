#!/usr/bin/env bash
# Build the splitrelay Vagrant box (libvirt provider) for one Debian release, from apt alone.
#
# Vagrant Cloud is out of reach here, so the box is made from Debian packages: debootstrap with
# the stock kernel and its matching headers plus bcc (the guest compiles the relay itself),
# systemd, openssh, sudo, iproute2, python3, and the relay's Python dependencies in
# /opt/splitrelay/.venv (the path deploy/systemd's units run from; the VMs have no route to PyPI).
# The disk is made without loop devices or mounts (truncate, sfdisk, mkfs.ext4 -d, dd) and one
# first boot under qemu installs GRUB from inside the guest.  Every stage is cached under
# $SPLITRELAY_VM_CACHE/<release>; a finished box whose inputs did not change is not rebuilt.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/vm-box.sh [--force] [RELEASE]

Build the Vagrant box splitrelay/debian<N> for RELEASE (bookworm = Debian 12, the default;
trixie = Debian 13) and add it with `vagrant box add`.  Idempotent: an unchanged box is kept.

  --force   rebuild every stage (debootstrap included)

Environment: SPLITRELAY_VM_CACHE (default /var/cache/splitrelay-vm), DEBIAN_MIRROR
(default http://deb.debian.org/debian).  Needs root, debootstrap, qemu-system-x86, qemu-utils,
fdisk, e2fsprogs and vagrant with vagrant-libvirt (`make vm-deps` installs them).
Example: make vm-box VM_RELEASES="bookworm trixie"
EOF
}

force=0
release=bookworm
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --force) force=1 ;;
    -*) echo "vm-box: error: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) release=$arg ;;
  esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
say() { printf 'vm-box[%s]: %s\n' "$release" "$*"; }

require_root "debootstrap and chroot"
case $release in
  bookworm) number=12 ;;
  trixie) number=13 ;;
  *) die "unknown release $release (bookworm or trixie)" 2 ;;
esac
require_tools debootstrap qemu-system-x86_64 qemu-img sfdisk mkfs.ext4 vagrant
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
curl -fsI "$mirror/dists/$release/Release" >/dev/null \
  || die "the mirror $mirror does not serve $release (no dists/$release/Release)" 4

box=$(box_name "$release")
dir=$VM_CACHE/$release
root=$dir/rootfs
mkdir -p "$dir"
[ $force = 1 ] && rm -rf "$root" "$dir"/*.stamp

# The inputs of the box: this script, the package list and the relay's Python dependencies.
python_deps=$(/usr/bin/python3 - "$here/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
# the runtime dependencies and the test tools the guest runs the corpus with (no linters, no plots)
dev = [d for d in project["optional-dependencies"]["dev"] if d.split(">")[0] in
       ("pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "scapy")]
print(" ".join(["setuptools>=68", "wheel"] + project["dependencies"] + dev))
PY
)
packages="linux-image-amd64,linux-headers-amd64,systemd,systemd-sysv,udev,dbus,openssh-server,sudo,\
iproute2,ethtool,python3,python3-venv,python3-bpfcc,bpfcc-tools,bpftool,grub-pc,initramfs-tools,kmod,\
procps,rsync,curl,ca-certificates,less"
# Stage keys: debootstrap depends only on the release and the package list (so editing this
# script does not redo its ~3 min); every later stage on this script and the Python deps too.
base_key=$(echo "$release $mirror $packages" | sha256sum | cut -c1-16)
inputs=$( { cat "$0"; echo "$base_key $python_deps"; } | sha256sum | cut -c1-16)

if [ -f "$dir/box.stamp" ] && [ "$(cat "$dir/box.stamp")" = "$inputs" ] && box_added "$box"; then
  say "box $box is up to date ($dir)"; exit 0
fi
t0=$SECONDS

# -- 1. debootstrap (the slow stage: ~2-3 min from deb.debian.org) ---------------------------
key_of() { if [ "$1" = rootfs ]; then echo "$base_key"; else echo "$inputs"; fi; }
stage() { [ -f "$dir/$1.stamp" ] && [ "$(cat "$dir/$1.stamp")" = "$(key_of "$1")" ]; }
done_stage() { key_of "$1" >"$dir/$1.stamp"; }
chroot_mounts=()
unmount_chroot() {
  local m
  for m in "${chroot_mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  chroot_mounts=()
}
trap unmount_chroot EXIT
in_root() {
  if [ ${#chroot_mounts[@]} = 0 ]; then
    mount -t proc proc "$root/proc" && chroot_mounts+=("$root/proc")
    mount --bind /dev "$root/dev" && chroot_mounts+=("$root/dev")
    mount -t devpts devpts "$root/dev/pts" -o newinstance && chroot_mounts+=("$root/dev/pts")
  fi
  DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 chroot "$root" "$@"
}

if ! stage rootfs; then
  rm -rf "$root" "$dir"/*.stamp
  say "debootstrap $release (minbase + stock kernel, headers, bcc, systemd, openssh; a few minutes)"
  debootstrap --variant=minbase --include="$packages" "$release" "$root" "$mirror" \
    >"$dir/debootstrap.log" 2>&1 || die "debootstrap failed: see $dir/debootstrap.log" 1
  done_stage rootfs
else
  say "debootstrap of $release cached"
fi

# -- 2. configure the guest: vagrant user, ssh, network, the relay's venv -------------------
if ! stage config; then
  say "configuring the guest (vagrant user with the insecure key, networkd, venv with the relay's deps)"
  kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
  [ -d "$root/usr/src/linux-headers-$kver" ] || die "no headers matching kernel $kver in the image" 1
  echo "splitrelay" >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 splitrelay\n' >"$root/etc/hosts"
  printf 'LABEL=root / ext4 errors=remount-ro 0 1\nbpffs /sys/fs/bpf bpf defaults 0 0\n' >"$root/etc/fstab"
  in_root useradd -m -s /bin/bash -U vagrant 2>/dev/null || true
  echo 'vagrant:vagrant' | in_root chpasswd
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$(vagrant_key_dir)/vagrant.pub" "$root/home/vagrant/.ssh/authorized_keys"
  printf 'UseDNS no\nGSSAPIAuthentication no\nHostKey /etc/ssh/ssh_host_ed25519_key\n' \
    >"$root/etc/ssh/sshd_config.d/vagrant.conf"
  # The management NIC (eth0, with net.ifnames=0) takes DHCP from libvirt's isolated network;
  # Vagrant writes 50-vagrant-ethN.network for the private ones.
  printf '[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n[DHCPv4]\nClientIdentifier=mac\n' \
    >"$root/etc/systemd/network/10-mgmt.network"
  in_root systemctl enable systemd-networkd ssh >/dev/null 2>&1
  in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
  say "pip install into /opt/splitrelay/.venv: $python_deps"
  in_root /usr/bin/python3 -m venv --system-site-packages /opt/splitrelay/.venv
  # pip trusts the host's CA bundle for this download only (a TLS-intercepting proxy's CA may be in
  # it); the image keeps Debian's own bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
  # shellcheck disable=SC2086
  env -u PIP_FIND_LINKS PIP_CERT=/tmp/host-ca.crt REQUESTS_CA_BUNDLE=/tmp/host-ca.crt \
    SSL_CERT_FILE=/tmp/host-ca.crt chroot "$root" /opt/splitrelay/.venv/bin/pip install -q --no-cache-dir \
    $python_deps >"$dir/pip.log" 2>&1 || { rm -f "$root/tmp/host-ca.crt"; die "pip install in the image failed: see $dir/pip.log" 1; }
  rm -f "$root/tmp/host-ca.crt"
  in_root apt-get clean
  # Every VM must be its own machine: with the box's machine-id shared, systemd-networkd's DHCP
  # client id (a DUID from it) was too, and libvirt's dnsmasq gave all three VMs one address.
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*  # host keys: made on first boot
  cat >"$root/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate this VM's own ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
# ed25519 only: RSA keygen took minutes of a TCG guest's first boot on a busy host
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
[Install]
WantedBy=multi-user.target
EOF
  in_root systemctl enable ssh-hostkeys >/dev/null 2>&1
  cat >"$root/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0 net.ifnames=0 biosdevname=0"
GRUB_TERMINAL=console
EOF
  # The first boot installs GRUB on the real disk from inside the guest, then powers off.
  cat >"$root/usr/local/sbin/sr-firstboot" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -o remount,rw /
grub-install --target=i386-pc /dev/vda && update-grub && echo "sr-firstboot: grub ok"
sync; mount -o remount,ro /; echo o >/proc/sysrq-trigger; sleep 60
EOF
  chmod 0755 "$root/usr/local/sbin/sr-firstboot"
  unmount_chroot
  rm -f "$dir/disk.stamp"
  done_stage config
fi

# -- 3. disk image: MBR + one ext4 partition, filled from the tree, no loop device ----------
if ! stage disk; then
  size_mb=6144
  say "making a ${size_mb} MiB disk from the tree (mkfs.ext4 -d, no loop device)"
  rm -f "$dir/disk.raw" "$dir/part.raw"
  truncate -s "${size_mb}M" "$dir/disk.raw"
  echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$dir/disk.raw"
  truncate -s "$((size_mb - 1))M" "$dir/part.raw"
  mkfs.ext4 -q -L root -d "$root" "$dir/part.raw" || die "mkfs.ext4 -d failed" 1
  dd if="$dir/part.raw" of="$dir/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$dir/part.raw"
  kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
  initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
  say "first boot under qemu ($(vm_accel_label)) to install GRUB"
  timeout 600 qemu-system-x86_64 -accel "$(vm_accel)" -m 1024 -smp 1 -nographic -no-reboot -nic none \
    -drive file="$dir/disk.raw",format=raw,if=virtio -kernel "$kernel" -initrd "$initrd" \
    -append "root=LABEL=root ro console=ttyS0 panic=-1 init=/usr/local/sbin/sr-firstboot" \
    </dev/null >"$dir/firstboot.log" 2>&1 || true
  grep -q 'sr-firstboot: grub ok' "$dir/firstboot.log" || die "first boot did not install GRUB: see $dir/firstboot.log" 1
  done_stage disk
fi

# -- 4. the box: qcow2 + metadata + Vagrantfile, added to vagrant -----------------------------
say "compressing the disk to qcow2"
qemu-img convert -c -O qcow2 "$dir/disk.raw" "$dir/box.img"
echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 6}' >"$dir/metadata.json"
cat >"$dir/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
tar -C "$dir" -cf "$dir/$release.box" metadata.json Vagrantfile box.img
say "vagrant box add $box"
vagrant box add --force --name "$box" "$dir/$release.box" >"$dir/box-add.log" 2>&1 \
  || die "vagrant box add failed: see $dir/box-add.log" 1
# libvirt keeps its own copy of a box's volume: drop it so the next `vagrant up` takes this one.
forget_box_volume "$box"
rm -f "$dir/$release.box"
echo "$inputs" >"$dir/box.stamp"
say "box $box built in $((SECONDS - t0)) s ($(du -h "$dir/box.img" | cut -f1) qcow2, kernel $(ls "$root/lib/modules" | sort -V | tail -n1))"

# Shared by the VM scripts (sourced): cache paths, box names, the accelerator probe, and the
# private network namespace libvirt runs in.
#
# libvirtd, virtlogd, their bridges and dnsmasq, and vagrant itself all live in the network
# namespace $VM_NETNS: it has no link to eth0 and no route anywhere, so no libvirt network
# (NAT or not) can ever reach the host's uplink, and the VMs have no route off the host.

VM_CACHE=${SPLITRELAY_VM_CACHE:-/var/cache/splitrelay-vm}
VM_NETNS=${SPLITRELAY_VM_NETNS:-srvm}
LIBVIRT_POOL_DIR=/var/lib/libvirt/images

die() { printf '%s: error: %s\n' "$(basename "$0" .sh)" "$1" >&2; exit "${2:-1}"; }
say() { printf '%s: %s\n' "$(basename "$0" .sh)" "$*"; }
require_root() { [ "$(id -u)" = 0 ] || die "must run as root ($1)" 3; }

require_tools() {
  local t missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: run make vm-deps" 4
}

box_name() { case $1 in bookworm) echo splitrelay/debian12 ;; trixie) echo splitrelay/debian13 ;; esac; }
box_added() { [[ $'\n'$(vagrant box list 2>/dev/null) == *$'\n'"$1 "* ]]; }   # no grep -q: pipefail
# Vagrant's well-known insecure key pair, as shipped with Debian's vagrant package.
vagrant_key_dir() { dirname "$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub | tail -n1)"; }

# KVM or TCG.  This machine's /dev/kvm is a PVM-style KVM on which a stock Debian kernel hangs in
# early boot, so /dev/kvm existing proves nothing: boot a stock kernel with no root disk under
# KVM and see whether it gets as far as its "cannot mount root" panic (1-2 s on a working KVM;
# under TCG the same boot takes ~4 s).  The answer is cached in $VM_CACHE/accel.
vm_accel() {
  local kernel
  if [ ! -s "$VM_CACHE/accel" ]; then
    kernel=$(ls "$VM_CACHE"/*/rootfs/boot/vmlinuz-* 2>/dev/null | sort -V | head -n1)
    [ -n "$kernel" ] || { echo tcg; return; }
    mkdir -p "$VM_CACHE"
    if [ -w /dev/kvm ] && timeout 30 qemu-system-x86_64 -accel kvm -m 256 -nographic -no-reboot -nic none \
         -kernel "$kernel" -append "console=ttyS0 panic=-1" </dev/null 2>&1 | grep -q -m1 'Kernel panic'; then
      echo kvm >"$VM_CACHE/accel"
    else
      echo tcg >"$VM_CACHE/accel"
    fi
  fi
  cat "$VM_CACHE/accel"
}
vm_accel_label() {
  case $(vm_accel) in
    kvm) echo "KVM" ;;
    *) echo "TCG, emulated: KVM here cannot boot a stock kernel" ;;
  esac
}
# vagrant-libvirt's domain type: kvm, or qemu (= TCG).
vm_driver() { case $(vm_accel) in kvm) echo kvm ;; *) echo qemu ;; esac; }

in_vm_netns() { ip netns exec "$VM_NETNS" "$@"; }

libvirt_running() {
  local pid
  pid=$(cat /run/libvirtd.pid 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && [ "$(ip netns identify "$pid" 2>/dev/null)" = "$VM_NETNS" ]
}

# The libvirt pool's copies of a box volume (vagrant-libvirt 0.11 names them <box, / as
# -VAGRANTSLASH->_vagrant_box_image_0_<box timestamp>_box.img): a rebuilt box gets a new name, so
# the old copies are only disk space; removed when the box is rebuilt.
forget_box_volume() {
  local path
  for path in "$LIBVIRT_POOL_DIR/$(echo "$1" | sed 's|/|-VAGRANTSLASH-|g')"_vagrant_box_image_0*; do
    [ -e "$path" ] || continue
    if libvirt_running; then
      virsh -q -c qemu:///system vol-delete --pool default "$(basename "$path")" >/dev/null 2>&1 || true
    fi
    rm -f "$path"
  done
}

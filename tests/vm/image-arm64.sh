#!/usr/bin/env bash
# The arm64 test VM's base image: Debian trixie set up like Raspberry Pi OS Trixie (systemd,
# NetworkManager, netplan.io, cloud-init, openssh-server, python3 3.13, no compiler), built once
# with mmdebstrap under qemu-user and cached outside the repository, next to image.sh's.
#
#   tests/vm/image-arm64.sh      # prints the image directory (built on the first call)
#
# The cache directory ($DLLAMA_VM_CACHE/image-arm64-<hash>) holds what image.sh's does:
# base.qcow2 (ext4, root=/dev/vda), vmlinuz and initrd.img for direct boot (qemu-system-aarch64
# -M virt), id_ed25519 (root's key; its own, not the x86 image's).
#
# The network is cloud-init's, as on a Pi: each VM's kernel command line carries NoCloud's
# meta-data (`ds=nocloud;i=INSTANCE;h=HOSTNAME`) and its network-config
# (`network-config=<base64 netplan v2>`, what Raspberry Pi Imager writes to the boot partition);
# cloud-init-local writes /etc/netplan/50-cloud-init.yaml (renderer NetworkManager) and netplan
# generates NetworkManager's profile in /run/NetworkManager/system-connections.
#
# e2fsprogs: cloud-init grows the root file system (resize2fs) on the first boot, as on a Pi.
# Speed: one mmdebstrap run installs everything; py3compile (dh_python's byte compilation in every
# python3-* postinst, most of the time under emulation) is diverted to /bin/true while it runs, so
# Python compiles what it imports at first use (cloud-init's modules on the first boot, which the
# e2e's booted snapshot keeps). Needs root, qemu-user-static with binfmt (update-binfmts --enable
# qemu-aarch64), mmdebstrap.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
. "$(dirname "$SCRIPT")/image-lib.sh"
SUITE=trixie
PACKAGES=systemd,systemd-sysv,libpam-systemd,udev,dbus,network-manager,netplan.io,cloud-init,openssh-server,python3,iproute2,nftables,iputils-ping,procps,sudo,e2fsprogs,initramfs-tools,linux-image-arm64

image_begin arm64 "$SCRIPT"

for tool in mmdebstrap mkfs.ext4 qemu-img ssh-keygen; do
  command -v "$tool" >/dev/null || { log "missing $tool (apt-get install mmdebstrap e2fsprogs qemu-utils openssh-client)"; exit 1; }
done
if [ "$(uname -m)" != aarch64 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 || {
    log "no binfmt for arm64 binaries (apt-get install qemu-user-static binfmt-support)"; exit 1; }
fi

# --- files in place before the first package is configured -----------------------------------
PRE="$WORK/pre"
# A small initrd, written once by the kernel's postinst: only what direct boot from virtio needs.
mkdir -p "$PRE/etc/initramfs-tools/conf.d" "$PRE/etc/initramfs-tools/hooks" "$PRE/etc/cloud/cloud.cfg.d"
echo "MODULES=list" >"$PRE/etc/initramfs-tools/conf.d/dllama-vm.conf"
cat >"$PRE/etc/initramfs-tools/hooks/dllama-vm" <<'EOF'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for module in virtio_pci virtio_blk ext4; do force_load "$module"; done
EOF
chmod 0755 "$PRE/etc/initramfs-tools/hooks/dllama-vm"
# cloud-init: NoCloud only (its seed on the kernel command line, as a Pi's is on the boot
# partition); root keeps the key it logs in with; the host keys are the image's.
cat >"$PRE/etc/cloud/cloud.cfg.d/90-dllama-e2e.cfg" <<'EOF'
datasource_list: [NoCloud, None]
disable_root: false
ssh_deletekeys: false
ssh_genkeytypes: []
manage_etc_hosts: true
EOF

# Under emulation every program a maintainer script runs costs: what only costs time in a VM with
# no internet and no hardware is left out, what runs once per package is run once at the end.
#  - py3compile (python3-* postinsts): Python compiles what it imports when it first does
#  - update-initramfs: once at the end, not after the kernel and again on every trigger
#  - no hardware database, no modules for hardware a virt machine lacks
#    (depmod and the initrd look at every module)
DIVERTED="/usr/bin/py3compile /usr/sbin/update-initramfs"
DIVERT_ON='for f in '"$DIVERTED"'; do chroot "$1" dpkg-divert --quiet --local --rename --add "$f" && ln -s /bin/true "$1$f"; done'
DIVERT_OFF='for f in '"$DIVERTED"'; do rm -f "$1$f" && chroot "$1" dpkg-divert --quiet --local --rename --remove "$f"; done'
EXCLUDE=('/usr/share/man/*' '/usr/share/locale/*' '/usr/share/doc/*' '/usr/lib/udev/hwdb.d/*')
for dir in drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/staging \
    drivers/infiniband drivers/iio drivers/bluetooth drivers/usb drivers/scsi drivers/hid drivers/input \
    drivers/video drivers/mmc drivers/mtd drivers/spi drivers/i2c drivers/hwmon drivers/net/can \
    drivers/net/usb drivers/crypto sound net/bluetooth net/wireless net/mac80211; do
  EXCLUDE+=("/usr/lib/modules/*/kernel/$dir/*")
done
# (CA certificates stay: python3-requests, which cloud-init imports, fails without a bundle.)
INCLUDE=('/usr/share/doc/*/copyright')

start=$SECONDS
log "mmdebstrap $SUITE arm64 from $MIRROR into $ROOT (several minutes under emulation)"
mmdebstrap --mode=root --architectures=arm64 --variant=minbase --include="$PACKAGES" \
  "${EXCLUDE[@]/#/--dpkgopt=path-exclude=}" "${INCLUDE[@]/#/--dpkgopt=path-include=}" \
  --setup-hook="cp -a '$PRE/.' \"\$1/\"" \
  --essential-hook="$DIVERT_ON" --customize-hook="$DIVERT_OFF" \
  --customize-hook='chroot "$1" update-initramfs -c -k all' \
  "$SUITE" "$ROOT" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 || {
  tail -n 40 "$WORK/mmdebstrap.log" >&2
  exit 1
}
log "mmdebstrap done in $((SECONDS - start)) s"

# --- configuration ------------------------------------------------------------------------------
echo "dllama-vm" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
echo "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1" >"$ROOT/etc/fstab"
image_ssh
# Only what costs boot time goes: waiting for the network, timers, trims.
image_mask NetworkManager-wait-online.service systemd-networkd-wait-online.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
  systemd-timesyncd.service dpkg-db-backup.timer
image_finish
